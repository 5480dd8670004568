"""oracle: checks hand-written gradients against torch.autograd on the identical model, and says where they go wrong.

    >>> import oracle, manual_bp as bp
    >>> result = oracle.check(spec, params, x, y, my_grads_fn)     # CheckResult
    >>> oracle.assert_gradients_match(spec, params, x, y, my_grads_fn)  # for pytest

``my_grads_fn(spec, params, x, y)`` returns ``(loss, grads)`` or ``(loss, grads, deltas)``: dicts of
NumPy arrays keyed ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,), and ``layers.{i}``
for δ_i = ∂C/∂z_i (m, units). ``manual_bp.gradients`` is the default candidate.
"""

__all__ = ["check", "assert_gradients_match", "CheckResult", "CandidateError", "TOLERANCES", "Tolerance", "TensorComparison"]

_HOME = {"check": "checker", "assert_gradients_match": "checker", "CheckResult": "checker", "CandidateError": "checker",
         "TOLERANCES": "compare", "Tolerance": "compare", "TensorComparison": "compare"}


def __getattr__(name):
    """Import torch only when the oracle is used, so ``bp-oracle --help`` stays instant."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'oracle' has no attribute {name!r}")
