"""What activations and losses share: a spec name, numeric parameters with defaults, equality, JSON.

Each parameter must be a finite number; what else it must be is data kept next to the class that
needs it: ``constraints`` maps a parameter to a ``Rule`` (e.g. softplus's ``beta > 0``), and
``validate()`` checks rules that tie parameters together (hardtanh's ``min_val < max_val``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import SpecError


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about arbitrary user input."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_key(key: Any) -> str:
    """A user's field name as it goes into an error's field: as written if printable, else its repr."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else show(key)


def count(n: int) -> str:
    """A whole number for a message: as is up to 10 digits, else like ``1.0e+18``."""
    if n < 10**10:
        return str(n)
    try:
        return f"{float(n):.1e}"
    except OverflowError:
        return "more than 1e+308"


@dataclass(frozen=True)
class Rule:
    """What one parameter must satisfy besides being a finite number.

    ``holds(value)`` tests it; ``problem`` follows the value in the message ("0.0 is not a positive
    number"); ``fix`` tells the user what to write and may use ``{key}``.
    """

    holds: Callable[[float], bool]
    problem: str
    fix: str


def positive_rule(why: str = "") -> Rule:
    """The rule ``value > 0``; ``why`` (optional) says what a non-positive value would break."""
    return Rule(lambda v: v > 0, "is not a positive number", "give {key} > 0" + (f" ({why})" if why else ""))


class Named:
    """A named function with parameters, e.g. ``leaky_relu(negative_slope=0.1)`` or ``huber(delta=1.0)``.

    Subclasses set ``name`` and ``defaults``; ``kind`` ("activation" or "loss") names the spec field
    in error messages. Every parameter must be a finite number; further:

    * ``constraints``: ``{parameter: Rule}``, e.g. ``{"beta": positive_rule()}``;
    * ``positive = True``: every parameter without its own rule must be > 0;
    * ``validate()``: override to check rules between parameters; raise ``SpecError(f"{kind}.{param}", ...)``.
    """

    name: str = ""
    defaults: ClassVar[dict[str, float]] = {}
    kind: str = ""
    positive: bool = False
    constraints: ClassVar[dict[str, Rule]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        stray = set(cls.constraints) - set(cls.defaults)
        if stray:  # a rule for a parameter the class does not have is a typo in the class
            raise TypeError(f"{cls.__name__}.constraints names unknown parameters: {sorted(stray)}")

    def rule(self, key: str) -> Rule | None:
        """The rule ``key`` must satisfy besides being finite (None: any finite number)."""
        if key in self.constraints:
            return self.constraints[key]
        return positive_rule() if self.positive else None

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults), key=str)
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise SpecError(self.kind, f"{self.name} has no parameter {show(unknown[0])}", f"its parameters are: {allowed}")
        self.params = {**self.defaults, **params}
        for key, val in self.params.items():
            number = not isinstance(val, bool) and isinstance(val, (int, float))
            try:
                value = float(val) if number else math.nan
            except OverflowError:  # an int beyond the float range, e.g. 10**400
                value = math.nan
            rule = self.rule(key)
            if not math.isfinite(value):
                problem = rule.problem if (rule and not number) else "is not a finite number"
                fix = rule.fix.format(key=key) if (rule and not number) else "give a number"
                raise SpecError(f"{self.kind}.{key}", f"{show(val)} {problem}", fix)
            if rule and not rule.holds(value):
                raise SpecError(f"{self.kind}.{key}", f"{show(val)} {rule.problem}", rule.fix.format(key=key))
            self.params[key] = value
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Rules between parameters; every single parameter has passed its own rule already."""

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
