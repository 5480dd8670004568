"""Hypothesis strategies for random networks, weights and data (public API).

Architectures are drawn by Hypothesis itself, so a failure shrinks toward the smallest network
(fewer layers, fewer units, simpler activations). Weights and data are drawn by NumPy from a seed
that Hypothesis chooses, in one of five named regimes, so large tensors stay cheap to generate:

* ``well_conditioned``: PyTorch's default init U(±1/√fan_in) and N(0, 1) inputs;
* ``saturated``: large weights and inputs, so |z| reaches tens and sigmoid/tanh/softplus saturate;
* ``near_zero``: weights and inputs around 1e-3, where every activation is nearly linear;
* ``near_kinks``: weights and inputs on a coarse grid of halves, so pre-activations hit relu's 0,
  hardtanh's ±1 and l1's zero residual *exactly*;
* ``exact_kinks``: integer and half-integer weights and data, zero biases, and ties: a weight row
  copied onto another (two units with the same z), a batch row repeated, an input column repeated and
  an all-zero example, so relu-type units sit at z = 0 exactly, max-type ties occur, and value targets
  on the same grid make l1/huber residuals exactly 0. All arithmetic through piecewise-linear layers
  is exact here (dyadic numbers), so every implementation sees the same elements on a kink.

Targets are random (not ones), so the upstream gradient is a random direction: a sum would hide a
transposed or permuted gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from manual_bp import ACTIVATIONS, LOSSES, Spec

REGIMES = ("well_conditioned", "saturated", "near_zero", "near_kinks", "exact_kinks")
ELEMENTWISE = tuple(name for name, cls in ACTIVATIONS.items() if not cls.output_only)
VALUE_LOSSES = ("half_sse", "sse", "half_mse", "mse", "l1", "huber", "smooth_l1")


def _activation_strategy(name: str):
    """An activation in spec form, with its parameters drawn where it has any."""
    if name == "leaky_relu":
        return st.builds(lambda s: {"name": name, "negative_slope": s}, st.sampled_from([0.01, 0.1, 0.2, 0.5]))
    if name == "elu":
        return st.builds(lambda a: {"name": name, "alpha": a}, st.sampled_from([1.0, 0.5, 1.5]))
    if name == "softplus":
        return st.builds(lambda b, t: {"name": name, "beta": b, "threshold": t},
                         st.sampled_from([1.0, 0.5, 2.0]), st.sampled_from([20.0, 5.0]))
    if name == "hardtanh":
        return st.builds(lambda lo, hi: {"name": name, "min_val": lo, "max_val": hi},
                         st.sampled_from([-1.0, -0.5, -2.0]), st.sampled_from([1.0, 0.5, 2.0]))
    return st.just(name)


def _loss_strategy(loss: str):
    if loss == "huber":
        return st.builds(lambda d: {"name": loss, "delta": d}, st.sampled_from([1.0, 0.5, 2.0]))
    if loss == "smooth_l1":
        return st.builds(lambda b: {"name": loss, "beta": b}, st.sampled_from([1.0, 0.5, 2.0]))
    return st.just(loss)


# Built once: strategies made inside every draw cost Hypothesis more than the check they feed.
_ACTIVATION = {name: _activation_strategy(name) for name in ACTIVATIONS}
_LOSS = {name: _loss_strategy(name) for name in LOSSES}


def _outputs_for(loss: str) -> tuple:
    """Output activations that fit ``loss``, and the least number of output units."""
    if loss == "bce":
        names = ("sigmoid", "softmax")
    elif loss == "nll":
        names = ("log_softmax",)
    elif loss in ("cross_entropy", "bce_with_logits"):
        names = ("identity",) + ELEMENTWISE
    else:
        names = ("identity",) + ELEMENTWISE + ("softmax",)
    return names, 2 if loss in ("cross_entropy", "nll") else 1


def specs(
    *,
    min_depth: int = 1,
    max_depth: int = 6,
    max_width: int = 32,
    max_input: int = 32,
    activations=ELEMENTWISE,
    losses=tuple(LOSSES),
    bias=None,
    output_activations=None,
    square: bool = False,
) -> st.SearchStrategy:
    """Random valid specs.

    * ``min_depth``/``max_depth``: number of dense layers (1–6 by default);
    * ``max_width``/``max_input``: largest hidden/output layer and input size;
    * ``activations``: names allowed on hidden layers;
    * ``losses``: names of losses to draw from (the output activation is drawn to fit the loss);
    * ``bias``: True/False to force, None to draw per layer;
    * ``output_activations``: names allowed on the output layer (among those that fit the loss);
    * ``square``: every layer has as many units as the input has features (square weights).

    Built from flat tuples and lists (no per-draw strategy objects), so drawing is cheap and a failure
    shrinks by dropping layers, narrowing them and moving to the first-listed activation.
    """
    bias_st = st.booleans() if bias is None else st.just(bias)
    hidden_act = st.one_of([_ACTIVATION[n] for n in activations])
    hidden = st.lists(st.tuples(hidden_act, st.integers(1, max_width), bias_st),
                      min_size=max(min_depth - 1, 0), max_size=max_depth - 1)

    def tail(loss):  # (loss spec, output activation, output units), prebuilt per loss below
        names, least = _outputs_for(loss)
        names = tuple(output_activations) if output_activations is not None else names
        return st.tuples(_LOSS[loss], st.one_of([_ACTIVATION[n] for n in names]),
                         st.integers(least, max(least, min(max_width, 10))), bias_st, st.just(least))

    tails = {loss: tail(loss) for loss in losses}
    width = st.integers(1, max_width) if square else st.just(None)

    def assemble(hidden_layers, tail_parts, input_size, square_width):
        loss_spec, out_act, out_units, out_bias, least = tail_parts
        if square_width is not None:
            n = max(square_width, least)
            hidden_layers = [(act, n, b) for act, _, b in hidden_layers]
            out_units = input_size = n
        layers = [{"type": "dense", "units": u, "activation": act, "bias": b} for act, u, b in hidden_layers]
        layers.append({"type": "dense", "units": out_units, "activation": out_act, "bias": out_bias})
        return Spec.from_dict({"format_version": 1, "input_size": input_size, "layers": layers, "loss": loss_spec})

    return st.builds(assemble, hidden, st.sampled_from(list(losses)).flatmap(tails.__getitem__),
                     st.integers(1, max_input), width)


def _grid(rng: np.random.Generator, shape, limit: int) -> np.ndarray:
    """Integers and half-integers in [-limit, limit], zero among them (exact in float32 and float64)."""
    return rng.integers(-2 * limit, 2 * limit + 1, shape) / 2


def _tie(rng: np.random.Generator, arr: np.ndarray, axis: int) -> None:
    """With probability ½, copy one row (axis 0) or column (axis 1) of ``arr`` onto another, in place."""
    n = arr.shape[axis]
    if n < 2 or rng.random() < 0.5:
        return
    src, dst = rng.choice(n, 2, replace=False)
    if axis == 0:
        arr[dst] = arr[src]
    else:
        arr[:, dst] = arr[:, src]


def draw_params(spec: Spec, rng: np.random.Generator, regime: str, dtype="float64") -> dict:
    """Weights for ``spec`` in a named regime (see the module docstring)."""
    params = {}
    n_in = spec.input_size
    for i, layer in enumerate(spec.layers):
        shape = (layer.units, n_in)
        if regime == "well_conditioned":
            k = 1 / np.sqrt(n_in)
            w, b = rng.uniform(-k, k, shape), rng.uniform(-k, k, layer.units)
        elif regime == "saturated":
            w, b = rng.normal(0, 6 / np.sqrt(n_in), shape), rng.normal(0, 3, layer.units)
        elif regime == "near_zero":
            w, b = rng.normal(0, 1e-3, shape), rng.normal(0, 1e-3, layer.units)
        elif regime == "near_kinks":
            w, b = rng.integers(-2, 3, shape) / 2, rng.integers(-2, 3, layer.units) / 2
        elif regime == "exact_kinks":
            w, b = _grid(rng, shape, 1), np.zeros(layer.units)
            _tie(rng, w, axis=0)  # two units with the same weights: tied z (softmax/max ties)
        else:
            raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}")
        params[f"layers.{i}.weight"] = w.astype(dtype)
        if layer.bias:
            params[f"layers.{i}.bias"] = b.astype(dtype)
        n_in = layer.units
    return params


def draw_data(spec: Spec, rng: np.random.Generator, regime: str, batch: int, dtype="float64"):
    """(x, y) for ``spec`` in a named regime; y fits the loss (values, probabilities or class indices)."""
    shape = (batch, spec.input_size)
    if regime == "saturated":
        x = rng.normal(0, 5, shape)
    elif regime == "near_zero":
        x = rng.normal(0, 1e-3, shape)
    elif regime == "near_kinks":
        x = rng.integers(-2, 3, shape) / 2
    elif regime == "exact_kinks":
        x = _grid(rng, shape, 2)
        _tie(rng, x, axis=0)  # a repeated example
        _tie(rng, x, axis=1)  # a repeated input feature
        if rng.random() < (0.5 if batch > 1 else 0.25):
            x[rng.integers(batch)] = 0  # an all-zero example: with zero biases, z = 0 exactly on every relu path
    else:
        x = rng.normal(0, 1, shape)
    n_out = spec.output_size
    if spec.loss.targets == "classes":
        y = rng.integers(0, n_out, batch)
    elif spec.loss.name in ("bce", "bce_with_logits"):
        if regime == "exact_kinks":
            y = (rng.integers(0, 3, (batch, n_out)) / 2).astype(dtype)
        else:
            y = rng.uniform(0, 1, (batch, n_out)).astype(dtype)
    elif regime in ("near_kinks", "exact_kinks"):
        y = (rng.integers(-2, 3, (batch, n_out)) / 2).astype(dtype)
    else:
        y = rng.normal(0, 1, (batch, n_out)).astype(dtype)
    return x.astype(dtype), y


@dataclass(frozen=True)
class Case:
    """One generated check: a spec, its weights and data, how they were drawn."""

    spec: Spec
    params: dict
    x: np.ndarray
    y: np.ndarray
    dtype: str
    regime: str
    seed: int

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        return f"Case({self.spec.describe()}, batch={self.x.shape[0]}, {self.dtype}, {self.regime}, seed={self.seed})"


@st.composite
def cases(draw, *, specs_strategy=None, regimes=REGIMES, dtypes=("float64", "float32"), max_batch: int = 8) -> Case:
    """A full check case.

    * ``specs_strategy``: where specs come from (default ``specs()``);
    * ``regimes``: names of weight/data regimes to draw from;
    * ``dtypes``: "float64" and/or "float32";
    * ``max_batch``: largest batch size (≥ 1).
    """
    spec = draw(specs_strategy if specs_strategy is not None else specs())
    regime = draw(st.sampled_from(list(regimes)))
    dtype = draw(st.sampled_from(list(dtypes)))
    batch = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params = draw_params(spec, rng, regime, dtype)
    x, y = draw_data(spec, rng, regime, batch, dtype)
    return Case(spec, params, x, y, dtype, regime, seed)
