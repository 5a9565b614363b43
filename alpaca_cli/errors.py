"""Errors a user can cause and fix. Anything else is a bug and keeps its traceback."""


class AlpacaError(Exception):
    """A handled failure: printed as one line (plus an optional hint), exit code 1."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(AlpacaError):
    """A configuration value, file or flag combination is invalid."""

    def __init__(self, problems: str | list[str], hint: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), hint)


class RunDirError(AlpacaError):
    """The run directory is missing, unreadable, from another version, or lacks a stage."""


class StageError(AlpacaError):
    """A stage cannot run on what the run directory holds (stale cache, finished run, bad step...)."""


class DataError(AlpacaError):
    """The training data cannot be read or a record is malformed."""
