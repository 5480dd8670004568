"""Parameters and data for a spec: validation with messages that name the field, and random draws.

Conventions shared by manual_bp, the oracle and the command line:

* ``params`` is a dict ``{"layers.{i}.weight": (out, in), "layers.{i}.bias": (out,)}`` of float32 or
  float64 arrays, all of one dtype.
* ``x`` is (m, input_size), one example per row. A single example may be given as the seed's
  column: shape (input_size,) or (input_size, 1).
* ``y`` is (m, n_out) target values, or (m,) integer class indices for cross_entropy / nll.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from .errors import SpecError
from .spec import Spec

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_of(name: str | np.dtype) -> np.dtype:
    """``"float32"`` or ``"float64"`` as a NumPy dtype; anything else is a SpecError."""
    try:
        dt = np.dtype(name)
    except TypeError:
        dt = None
    if dt not in FLOAT_DTYPES:
        raise SpecError("dtype", f"{name!r} is not supported", "use float64 (the reference) or float32")
    return dt


def _finite(arr: np.ndarray, field: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(i) for i in bad)
        raise SpecError(field, f"holds {arr[where]} at index {where}", "give finite numbers only (no NaN or Inf)")


def check_params(spec: Spec, params: Mapping[str, np.ndarray]) -> np.dtype:
    """Check names, shapes, dtype and finiteness of ``params`` against ``spec``; returns their dtype."""
    if not isinstance(params, Mapping):
        raise SpecError("params", f"is a {type(params).__name__}, not a dict of arrays", "pass {name: array}")
    expected = spec.param_shapes()
    missing = [k for k in expected if k not in params]
    if missing:
        raise SpecError(f"params[{missing[0]!r}]", "missing", f"the spec needs: {', '.join(expected)}")
    extra = [k for k in params if k not in expected]
    if extra:
        raise SpecError(f"params[{extra[0]!r}]", "is not a parameter of this spec", f"the spec has: {', '.join(expected)}")
    dtype = None
    for name, shape in expected.items():
        arr = params[name]
        field = f"params[{name!r}]"
        if not isinstance(arr, np.ndarray):
            raise SpecError(field, f"is a {type(arr).__name__}, not a NumPy array", "pass numpy arrays")
        if arr.dtype not in FLOAT_DTYPES:
            raise SpecError(field, f"has dtype {arr.dtype}", "use float64 or float32")
        if dtype is not None and arr.dtype != dtype:
            raise SpecError(field, f"has dtype {arr.dtype} but the other parameters are {dtype}", "use one dtype for all")
        dtype = arr.dtype
        if arr.shape != shape:
            raise SpecError(field, f"has shape {arr.shape} but the spec needs {shape}", "check units and input_size")
        _finite(arr, field)
    return dtype


def as_batch(spec: Spec, x: np.ndarray) -> tuple[np.ndarray, bool]:
    """x as (m, input_size) rows, and whether it came as the seed's single column."""
    if not isinstance(x, np.ndarray):
        raise SpecError("x", f"is a {type(x).__name__}, not a NumPy array", "pass a numpy array")
    n = spec.input_size
    if x.ndim == 1 and x.shape[0] == n:
        return x[None, :], True
    if x.ndim == 2 and x.shape == (n, 1) and n > 1:
        return x.T, True
    if x.ndim == 2 and x.shape[1] == n and x.shape[0] >= 1:
        return x, False
    raise SpecError("x", f"has shape {x.shape}", f"give (batch, {n}) rows, or one example as ({n},) or ({n}, 1)")


def check_x(spec: Spec, x: np.ndarray, dtype: np.dtype | None = None) -> tuple[np.ndarray, bool]:
    """Validate x: returns it as (m, input_size) rows, and whether it came as one column example."""
    x2, single = as_batch(spec, x)
    if x2.dtype not in FLOAT_DTYPES:
        raise SpecError("x", f"has dtype {x2.dtype}", "use float64 or float32")
    if dtype is not None and x2.dtype != dtype:
        raise SpecError("x", f"has dtype {x2.dtype} but the parameters are {dtype}", "use one dtype for x and params")
    _finite(x2, "x")
    return x2, single


def check_y(spec: Spec, y: np.ndarray, m: int, single: bool, dtype: np.dtype) -> np.ndarray:
    """Validate targets for m examples: (m, n_out) values in ``dtype``, or (m,) int64 class indices."""
    n_out = spec.output_size
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if spec.loss.targets == "classes":
        y2 = y.reshape(-1) if (single and y.size == 1) else y
        if y2.shape != (m,):
            raise SpecError("y", f"has shape {y.shape}", f"give ({m},) class indices, one per example")
        if y2.dtype.kind not in "iu":
            if y2.dtype.kind == "f" and np.all(np.isfinite(y2)) and np.all(y2 == np.round(y2)):
                y2 = y2.astype(np.int64)
            else:
                raise SpecError("y", f"has dtype {y2.dtype}", f"give integer class indices in [0, {n_out})")
        if y2.size and (y2.min() < 0 or y2.max() >= n_out):
            bad = int(y2.min()) if y2.min() < 0 else int(y2.max())
            raise SpecError("y", f"holds class {bad}", f"class indices must lie in [0, {n_out})")
        return y2.astype(np.int64, copy=False)
    if single and y.size == n_out:
        y2 = y.reshape(1, n_out)
    elif y.shape == (m, n_out):
        y2 = y
    elif n_out == 1 and y.shape == (m,):
        y2 = y[:, None]
    else:
        raise SpecError("y", f"has shape {y.shape}", f"give ({m}, {n_out}) targets, one row per example")
    if y2.dtype.kind not in "fiu":
        raise SpecError("y", f"has dtype {y2.dtype}", "give numbers")
    y2 = y2.astype(dtype, copy=False)
    _finite(y2, "y")
    if spec.loss.name in ("bce", "bce_with_logits") and (y2.min() < 0 or y2.max() > 1):
        raise SpecError("y", "holds values outside [0, 1]", f"{spec.loss.name} targets are probabilities in [0, 1]")
    return y2


def check_data(spec: Spec, params, x: np.ndarray, y: np.ndarray):
    """Validate params, x and y together: returns (dtype, x rows, y rows, single)."""
    dtype = check_params(spec, params)
    x2, single = check_x(spec, x, dtype)
    return dtype, x2, check_y(spec, y, x2.shape[0], single, dtype), single


def init_params(spec: Spec, rng: np.random.Generator, dtype="float64", scale: float = 1.0) -> dict[str, np.ndarray]:
    """Parameters drawn like ``torch.nn.Linear``'s default: U(−k, k), k = scale/√fan_in."""
    dt = dtype_of(dtype)
    params = {}
    for name, shape in spec.param_shapes().items():
        fan_in = shape[1] if len(shape) == 2 else params[name.replace("bias", "weight")].shape[1]
        k = scale / np.sqrt(fan_in)
        params[name] = rng.uniform(-k, k, size=shape).astype(dt)
    return params


class Batch(NamedTuple):
    x: np.ndarray
    y: np.ndarray


def random_batch(spec: Spec, rng: np.random.Generator, batch: int = 4, dtype="float64") -> Batch:
    """Inputs N(0, 1) and targets that fit the loss (probabilities, class indices or values)."""
    dt = dtype_of(dtype)
    x = rng.standard_normal((batch, spec.input_size)).astype(dt)
    n_out = spec.output_size
    if spec.loss.targets == "classes":
        y = rng.integers(0, n_out, size=batch).astype(np.int64)
    elif spec.loss.name in ("bce", "bce_with_logits"):
        y = rng.uniform(0, 1, size=(batch, n_out)).astype(dt)
    else:
        y = rng.standard_normal((batch, n_out)).astype(dt)
    return Batch(x, y)


def random_case(spec: Spec, seed: int, batch: int = 4, dtype="float64", scale: float = 1.0):
    """(params, x, y) drawn from one seeded generator: ``init_params`` first, then ``random_batch``."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, rng, dtype=dtype, scale=scale)
    x, y = random_batch(spec, rng, batch=batch, dtype=dtype)
    return params, x, y
