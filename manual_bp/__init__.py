"""manual_bp: backpropagation written out by hand in NumPy, as the textbook equations.

No autograd and no torch: this package is what the oracle checks against ``torch.autograd``.

    >>> import numpy as np, manual_bp as bp
    >>> spec = bp.example("seed-simple")
    >>> rng = np.random.default_rng(0)
    >>> params = bp.init_params(spec, rng)
    >>> x, y = bp.random_batch(spec, rng, batch=4)
    >>> result = bp.gradients(spec, params, x, y)     # loss, grads, deltas, grad_input
"""

from .activations import ACTIVATIONS, Activation, make_activation
from .data import check_data, check_params, dtype_of, init_params, random_batch, random_case
from .errors import SpecError
from .layers import LAYER_TYPES, Dense, keep_mask
from .losses import LOSSES, Loss, make_loss
from .network import Cache, Gradients, backward, forward, gradients
from .spec import FORMAT_VERSION, Spec, example, example_names, load_spec

__all__ = [
    "ACTIVATIONS", "Activation", "make_activation",
    "LOSSES", "Loss", "make_loss",
    "LAYER_TYPES", "Dense", "keep_mask",
    "FORMAT_VERSION", "Spec", "load_spec", "example", "example_names",
    "check_data", "check_params", "dtype_of", "init_params", "random_batch", "random_case",
    "Cache", "Gradients", "forward", "backward", "gradients",
    "SpecError",
]
