"""oracle: checks hand-written gradients against torch.autograd on the identical model, and says where they go wrong.

    >>> import oracle, manual_bp as bp
    >>> result = oracle.check(spec, params, x, y, my_grads_fn)     # CheckResult
    >>> oracle.assert_gradients_match(spec, params, x, y, my_grads_fn)  # for pytest

``my_grads_fn(spec, params, x, y)`` returns ``(loss, grads)`` or ``(loss, grads, deltas)``: dicts of
NumPy arrays keyed ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,), and ``layers.{i}``
for δ_i = ∂C/∂z_i (m, units). ``manual_bp.gradients`` is the default candidate.
"""

import os

# NumPy's OpenBLAS worker threads spin for ~0.1 s after each call, and torch's OpenMP workers spin
# after each parallel region; a check alternates between the two, so on a small machine each
# library's spinning threads steal the cores the other needs (measured: a check at 256-512-512-10
# took 1.5x its halves run alone). Let idle workers sleep at once. These only take effect when the
# oracle is imported before NumPy and torch (as ``bp-oracle`` does), and never override a user's choice.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["check", "assert_gradients_match", "CheckResult", "CandidateError", "CandidateCrash", "TOLERANCES", "Tolerance", "TensorComparison", "IsolatedCandidate"]

_HOME = {"check": "checker", "assert_gradients_match": "checker", "CheckResult": "checker", "CandidateError": "checker", "CandidateCrash": "checker",
         "TOLERANCES": "compare", "Tolerance": "compare", "TensorComparison": "compare",
         "IsolatedCandidate": "isolate"}


def __getattr__(name):
    """Import torch only when the oracle is used, so ``bp-oracle --help`` stays instant."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'oracle' has no attribute {name!r}")
