"""What activations and losses share: a spec name, numeric parameters with defaults, equality, JSON."""

from __future__ import annotations

import math
from typing import Any

from .errors import SpecError


class Named:
    """A named function with parameters, e.g. ``leaky_relu(negative_slope=0.1)`` or ``huber(delta=1.0)``.

    Subclasses set ``name`` and ``defaults``; ``kind`` ("activation" or "loss") names the spec field
    in error messages, and ``positive`` says whether every parameter must be > 0.
    """

    name: str = ""
    defaults: dict[str, float] = {}
    kind: str = ""
    positive: bool = False

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise SpecError(self.kind, f"{self.name} has no parameter {unknown[0]!r}", f"its parameters are: {allowed}")
        self.params = {**self.defaults, **params}
        for key, val in self.params.items():
            number = not isinstance(val, bool) and isinstance(val, (int, float)) and math.isfinite(val)
            if self.positive and not (number and val > 0):
                raise SpecError(f"{self.kind}.{key}", f"{val!r} is not a positive number", f"give {key} > 0")
            if not number:
                raise SpecError(f"{self.kind}.{key}", f"{val!r} is not a finite number", "give a number")
            self.params[key] = float(val)
            setattr(self, key, float(val))

    def to_json(self) -> str | dict[str, Any]:
        """The spec form: a bare name, or ``{"name": ..., param: value}`` when it has parameters."""
        return {"name": self.name, **self.params} if self.params else self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"
