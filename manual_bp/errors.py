"""The one error type users see from manual_bp and the oracle."""


class SpecError(ValueError):
    """Bad user input: a malformed spec, wrong shapes, non-finite numbers, an unknown name.

    The message always names the offending field, the value found there, and what to do instead,
    e.g. ``layers[1].activation: unknown activation 'sigmod'; choose one of: ...``.
    """

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f"; {fix}"
        super().__init__(message)
