"""Errors a user can cause and fix. Anything else is a bug and keeps its traceback."""


class AlpacaError(Exception):
    """A handled failure: printed as one line (plus an optional hint), exit code 1."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def __reduce__(self):
        # pickled whole (a worker process's error reaches the parent with its hint; Exception's default keeps args)
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):
    e = Exception.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


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


class InternalError(AlpacaError):
    """Something alpaca did not expect: a bug, reported in one line (ALPACA_DEBUG=1 shows the traceback)."""


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message, at most `limit` characters ("" for an empty message): what a
    one-line error quotes of the exception it reports."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


def explain(e: BaseException) -> AlpacaError:
    """The one-line error a user sees for any exception: handled ones as they are, the file system's and the
    accelerator's in words that say what to do, anything else as an internal error."""
    import errno

    if isinstance(e, AlpacaError):
        return e
    text = str(e)
    if isinstance(e, OSError) and e.errno is not None:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason = "read-only file system" if e.errno == errno.EROFS else "permission denied"
            return RunDirError(f"cannot write{where}: {reason}",
                               hint="use a --run-dir (or --output) you can write to, or fix its permissions")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return RunDirError(f"no space left on the device writing{where}",
                               hint="free some space (old checkpoints: --keep-checkpoints) or use another --run-dir")
    if "No space left on device" in text or "ENOSPC" in text:
        return RunDirError("no space left on the device (while writing a cache or checkpoint)",
                           hint="free some space (old checkpoints: --keep-checkpoints) or use another --run-dir")
    if "RESOURCE_EXHAUSTED" in text and ("memory" in text.lower() or "allocat" in text.lower()):
        return StageError("out of accelerator memory",
                          hint="lower --per-device-rows or --seq-len, keep --remat on, add devices (FSDP) or "
                               "--tensor-parallel; `alpaca train --dry-run` estimates the memory")
    return InternalError(f"internal error: {type(e).__name__}: {first_line(e)}",
                         hint="please report it with the traceback (ALPACA_DEBUG=1)")
