"""Parameters and data for a spec: validation with messages that name the field, and random draws.

Conventions shared by manual_bp, the oracle and the command line:

* ``params`` is a dict ``{"layers.{i}.weight": (out, in), "layers.{i}.bias": (out,)}`` of float32 or
  float64 arrays, all of one dtype.
* ``x`` is (m, input_size), one example per row. A single example may be given as the seed's
  column: shape (input_size,) or (input_size, 1).
* ``y`` is (m, n_out) target values, or (m,) integer class indices for cross_entropy / nll. A network with a
  per-step head (output (T, n_out) per example) takes (m, T, n_out) values (or (m, T) when n_out = 1), or (m, T)
  class indices. A class index of −100 (torch's default ``ignore_index``) marks an example or a step that the loss
  ignores (its mean is over the others); not every target may be −100.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from .errors import SpecError
from .losses import IGNORE_INDEX
from .named import count, show
from .spec import Spec

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: most values one array of activations may hold (batch × the widest layer): 16 GiB in float64
MAX_VALUES = 2**31
_REAL = "give real numbers as float64 or float32"
_DTYPE_WORDS = {"c": "complex numbers", "O": "Python objects", "U": "text", "S": "bytes", "b": "true/false values",
                "V": "raw records", "M": "dates", "m": "time spans"}


def ensure_real(name: str, arr: Any, fix: str = _REAL) -> np.ndarray:
    """``arr`` as a NumPy array of real numbers (float, int or unsigned); anything else is a SpecError.

    Call it before any ``astype``: casting complex to float drops the imaginary part (only a
    ComplexWarning says so), and object, text or bool arrays would be cast into numbers silently.
    """
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except (ValueError, TypeError, RecursionError, OverflowError) as err:
            raise SpecError(name, f"is not an array of numbers ({type(err).__name__})", fix) from None
    kind = arr.dtype.kind
    if kind not in "fiu":
        words = _DTYPE_WORDS.get(kind, "values that are not real numbers")
        raise SpecError(name, f"has dtype {arr.dtype} ({words})", fix)
    return arr


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(field: str, values: int, itemsize: int, what: str, fix: str) -> None:
    """Refuse drawing more than MAX_VALUES values, or more bytes than half this machine's memory."""
    if values > MAX_VALUES:
        raise SpecError(field, f"{what} is {count(values)} values, too many", fix)
    memory = _memory_bytes()
    if memory and values * itemsize > memory // 2:
        raise SpecError(field, f"{what} needs {values * itemsize / 2**30:.1f} GiB, more than half of this machine's "
                        f"{memory / 2**30:.1f} GiB of memory", fix)


def dtype_of(name: str | np.dtype) -> np.dtype:
    """``"float32"`` or ``"float64"`` as a NumPy dtype; anything else is a SpecError."""
    try:
        dt = np.dtype(name)
    except (TypeError, ValueError, SyntaxError):  # SyntaxError: some malformed dtype strings
        dt = None
    if dt is None or dt not in FLOAT_DTYPES:  # (None == np.dtype("float64") is True in NumPy)
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
    expected = spec.state_shapes()
    missing = [k for k in expected if k not in params]
    if missing:
        raise SpecError(f"params[{missing[0]!r}]", "missing", f"the spec needs: {', '.join(expected)}")
    # torch's BatchNorm state_dict also holds num_batches_tracked (its step count, used only when momentum is
    # None): accepted beside the running statistics so that a saved torch state_dict loads, and not used
    counters = {k[: -len("running_mean")] + "num_batches_tracked" for k in expected if k.endswith(".running_mean")}
    for k in counters & set(params):
        arr = np.asarray(params[k])
        if arr.shape != () or arr.dtype.kind not in "iuf" or not np.isfinite(arr) or arr < 0 or arr != np.round(arr):
            raise SpecError(f"params[{k!r}]", f"is {show(params[k])}", "give the step count as one whole number ≥ 0, or leave it out")
    extra = [k for k in params if k not in expected and k not in counters]
    if extra:
        raise SpecError(f"params[{extra[0]!r}]", "is not a parameter of this spec", f"the spec has: {', '.join(expected)}")
    dtype = None
    for name, shape in expected.items():  # (num_batches_tracked, checked above, keeps its own integer dtype)
        arr = params[name]
        field = f"params[{name!r}]"
        if not isinstance(arr, np.ndarray):
            raise SpecError(field, f"is a {type(arr).__name__}, not a NumPy array", "pass numpy arrays")
        ensure_real(field, arr)
        if arr.dtype not in FLOAT_DTYPES:
            raise SpecError(field, f"has dtype {arr.dtype}", "use float64 or float32")
        if dtype is not None and arr.dtype != dtype:
            raise SpecError(field, f"has dtype {arr.dtype} but the other parameters are {dtype}", "use one dtype for all")
        dtype = arr.dtype
        if arr.shape != shape:
            raise SpecError(field, f"has shape {arr.shape} but the spec needs {shape}", "check units and input_size")
        _finite(arr, field)
        if name.endswith(".running_var") and arr.size and arr.min() < 0:
            raise SpecError(field, f"holds a negative variance {arr.min():g}", "running variances are ≥ 0")
    return dtype


def as_batch(spec: Spec, x: np.ndarray) -> tuple[np.ndarray, bool]:
    """x as (m, *input_shape), batch first, and whether it came as the seed's single column
    (a vector input only: (n,) or (n, 1))."""
    if not isinstance(x, np.ndarray):
        raise SpecError("x", f"is a {type(x).__name__}, not a NumPy array", "pass a numpy array")
    shape = tuple(spec.input_shape)
    if len(shape) > 1:
        if x.ndim == len(shape) + 1 and x.shape[1:] == shape and x.shape[0] >= 1:
            return x, False
        want = ", ".join(str(d) for d in shape)
        raise SpecError("x", f"has shape {x.shape}", f"give (batch, {want}): the batch first, then the spec's input shape")
    n = shape[0]
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
    if spec.token_input:
        return _check_tokens(spec, x2), single
    ensure_real("x", x2)
    if x2.dtype not in FLOAT_DTYPES:
        raise SpecError("x", f"has dtype {x2.dtype}", "use float64 or float32")
    widest = _widest(spec)
    if x2.shape[0] * widest > MAX_VALUES:
        raise SpecError("x", f"has {x2.shape[0]} rows: {count(x2.shape[0] * widest)} values in the widest layer ({widest})",
                        f"give at most {MAX_VALUES // widest} rows at once")
    if dtype is not None and x2.dtype != dtype:
        raise SpecError("x", f"has dtype {x2.dtype} but the parameters are {dtype}", "use one dtype for x and params")
    _finite(x2, "x")
    spec.check_batch(x2.shape[0])
    return x2, single


def _check_tokens(spec: Spec, x: np.ndarray) -> np.ndarray:
    """Token indices for an embedding: integers in [0, num_embeddings), as int64."""
    v = spec.layers[0].num_embeddings
    if x.dtype.kind not in "iu":
        raise SpecError("x", f"has dtype {x.dtype}, but the first layer is an embedding",
                        f"give integer token indices in [0, {v}) (int64)")
    if x.size and (x.min() < 0 or x.max() >= v):
        bad = int(x.min()) if x.min() < 0 else int(x.max())
        raise SpecError("x", f"holds token {bad}", f"token indices must lie in [0, {v}) (num_embeddings)")
    if x.shape[0] * _widest(spec) > MAX_VALUES:
        raise SpecError("x", f"has {x.shape[0]} rows", f"give at most {MAX_VALUES // _widest(spec)} rows at once")
    spec.check_batch(x.shape[0])
    return x.astype(np.int64, copy=False)


def check_y(spec: Spec, y: np.ndarray, m: int, single: bool, dtype: np.dtype) -> np.ndarray:
    """Validate targets for m examples: (m, n_out) values in ``dtype``, or (m,) int64 class indices; for a
    sequence output (T, n_out) (a per-step head), (m, T, n_out) values ((m, T) taken when n_out = 1) or (m, T)
    class indices. A class index of −100 (``losses.IGNORE_INDEX``) is kept: the loss ignores that row."""
    n_out = spec.output_size
    out = tuple(spec.output_shape)
    lead = (int(m), *out[:-1])  # one target per example (m,), or per step of each example (m, T)
    what = "one per example" if len(out) == 1 else "one per step of each example"
    classes = spec.loss.targets == "classes"
    y = ensure_real("y", y, f"give integer class indices in [0, {n_out})" if classes else _REAL)
    if classes:
        y2 = y.reshape(-1) if (single and y.size == 1) else y
        if y2.shape != lead:
            raise SpecError("y", f"has shape {y.shape}", f"give {lead} class indices, {what}")
        if y2.dtype.kind not in "iu":
            if y2.dtype.kind == "f" and np.all(np.isfinite(y2)) and np.all(y2 == np.round(y2)):
                y2 = y2.astype(np.int64)
            else:
                raise SpecError("y", f"has dtype {y2.dtype}", f"give integer class indices in [0, {n_out})")
        kept = y2[y2 != IGNORE_INDEX]
        if y2.size and not kept.size:
            raise SpecError("y", "every target is −100 (ignored): nothing to average",
                            f"keep at least one class index in [0, {n_out}); torch's mean over no targets is NaN")
        if kept.size and (kept.min() < 0 or kept.max() >= n_out):
            bad = int(kept.min()) if kept.min() < 0 else int(kept.max())
            raise SpecError("y", f"holds class {bad}",
                            f"class indices must lie in [0, {n_out}), or be −100 to ignore {'an example' if len(out) == 1 else 'a step'}")
        return y2.astype(np.int64, copy=False)
    if single and y.size == n_out and len(out) == 1:
        y2 = y.reshape(1, n_out)
    elif y.shape == (m, *out):
        y2 = y
    elif n_out == 1 and y.shape == lead:
        y2 = y[..., None]
    else:
        rows = "one row per example" if len(out) == 1 else "one row per step of each example"
        raise SpecError("y", f"has shape {y.shape}", f"give {(m, *out)} targets, {rows}")
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


def _widest(spec: Spec) -> int:
    """The most values one example takes in any layer (input included)."""
    return max([spec.input_size] + [math.prod(spec.out_shape(i)) for i in range(len(spec.layers))])


def init_params(spec: Spec, rng: np.random.Generator, dtype="float64", scale: float = 1.0) -> dict[str, np.ndarray]:
    """Parameters drawn like ``torch.nn.Linear``'s and ``Conv``'s default: U(−k, k), k = scale/√fan_in."""
    dt = dtype_of(dtype)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise SpecError("scale", f"{show(scale)} is not a positive number", "give scale > 0 (1 draws like torch.nn.Linear)")
    shapes = spec.param_shapes()
    total = sum(math.prod(shape) for shape in shapes.values())
    _check_fits("layers", total, 8, f"drawing {count(total)} parameters", "use fewer or narrower layers")
    params = {}
    try:
        for name, shape in shapes.items():
            weight = shape if name.endswith("weight") else shapes[name.replace("bias", "weight")]
            fan_in = math.prod(weight[1:])  # in (dense) or in/groups · kernel (conv), as torch counts it
            k = scale / np.sqrt(fan_in)    # a norm's γ and β, 1-D, draw from U(−scale, scale)
            params[name] = rng.uniform(-k, k, size=shape).astype(dt)
        for name, shape in spec.buffer_shapes().items():  # running statistics: means around 0, variances ≥ 0.5
            low, high = (0.5, 2.0) if name.endswith("running_var") else (-0.5, 0.5)
            params[name] = rng.uniform(low, high, size=shape).astype(dt)
    except MemoryError:
        raise SpecError("layers", f"{count(total)} parameters do not fit in memory", "use fewer or narrower layers") from None
    return params


class Batch(NamedTuple):
    x: np.ndarray
    y: np.ndarray


def _batch_size(spec: Spec, batch: Any) -> int:
    """``batch`` as a whole number ≥ 1 whose (batch, widest layer) activations can be held."""
    try:
        m = operator.index(batch) if not isinstance(batch, bool) else None
    except TypeError:
        m = None
    if m is None:
        raise SpecError("batch", f"{show(batch)} is not a whole number", "give the number of examples, e.g. 4")
    if m < 1:
        raise SpecError("batch", f"{m} is not positive", "give at least 1 example")
    widest = _widest(spec)
    _check_fits("batch", m * widest, 8, f"{count(m)} examples × {widest} (the widest layer)",
                f"give a batch of at most {max(1, MAX_VALUES // widest)}")
    return m


def random_batch(spec: Spec, rng: np.random.Generator, batch: int = 4, dtype="float64") -> Batch:
    """Inputs N(0, 1) and targets that fit the loss (probabilities, class indices or values): one per example,
    or one per step of each example for a sequence output (none ignored)."""
    dt = dtype_of(dtype)
    batch = _batch_size(spec, batch)
    n_out = spec.output_size
    out = (batch, *spec.output_shape)  # (batch, n_out), or (batch, T, n_out)
    try:
        if spec.token_input:
            x = rng.integers(0, spec.layers[0].num_embeddings, (batch, *spec.input_shape))
        else:
            x = rng.standard_normal((batch, *spec.input_shape)).astype(dt)
        if spec.loss.targets == "classes":
            y = rng.integers(0, n_out, size=out[:-1]).astype(np.int64)
        elif spec.loss.name in ("bce", "bce_with_logits"):
            y = rng.uniform(0, 1, size=out).astype(dt)
        else:
            y = rng.standard_normal(out).astype(dt)
    except MemoryError:
        raise SpecError("batch", f"{batch} examples do not fit in memory", "give a smaller batch") from None
    return Batch(x, y)


def random_case(spec: Spec, seed: int, batch: int = 4, dtype="float64", scale: float = 1.0):
    """(params, x, y) drawn from one seeded generator: ``init_params`` first, then ``random_batch``."""
    _batch_size(spec, batch)  # before drawing the parameters, so a bad batch costs nothing
    if isinstance(seed, bool):
        raise SpecError("seed", f"{seed!r} is not a whole number", "give a seed ≥ 0")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise SpecError("seed", f"{show(seed)} is not a valid seed", "give a whole number ≥ 0") from None
    params = init_params(spec, rng, dtype=dtype, scale=scale)
    x, y = random_batch(spec, rng, batch=batch, dtype=dtype)
    return params, x, y
