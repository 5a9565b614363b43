"""Console logging for the whole process: one owner for the root logger's handlers.

`main` configures them once (`setup`); Levanter's trainer replaces them when it starts (its `init_logging` clears
the root handlers and adds its own console and file handlers), so training restores ours around that call
(`keep_console_handlers`) and keeps only Levanter's log file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys


def _console_filter(verbose: bool):
    def keep(record: logging.LogRecord) -> bool:
        return verbose or record.levelno >= logging.WARNING or record.name.startswith("alpaca_cli")

    return keep


def setup(verbose: bool) -> None:
    """stderr shows our INFO lines and everyone's warnings (everything with --verbose)."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_console_filter(verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("alpaca_cli").setLevel(logging.INFO)
    # Levanter warns "Unknown leaf type <class 'NoneType'>" for every empty optional field of a state it restores
    # from a checkpoint (levanter/tensorstore_serialization.py, _sharding_from_leaf); the warning is harmless.
    logging.getLogger("levanter.tensorstore_serialization").addFilter(
        lambda r: "Unknown leaf type <class 'NoneType'>" not in r.getMessage()
    )
    # gcsfs logs a traceback for every request it gives up on; the error itself reaches the user as one line
    logging.getLogger("gcsfs").setLevel(logging.INFO if verbose else logging.CRITICAL)
    # ...and "No checkpoints found in ..." as a warning at the start of every fresh run.
    logging.getLogger("levanter.checkpoint").addFilter(lambda r: "No checkpoints found in" not in r.getMessage())


@contextlib.contextmanager
def keep_console_handlers():
    """Around Levanter's logging initialisation: afterwards the console handlers are ours again, plus Levanter's
    log file (which records INFO lines of every library)."""
    root = logging.getLogger()
    ours, level = list(root.handlers), root.level
    # marin-levanter's init_logging enables faulthandler on sys.stderr (rigging/log_setup.py: install_fault_handler),
    # which dies with "UnsupportedOperation: fileno" when stderr is not a file (captured, as in a notebook or
    # pytest's capsys); without a file descriptor there is nothing for it to write to, so it is skipped then.
    if not _has_fileno(sys.stderr):
        os.environ.setdefault("RIGGING_DISABLE_FAULTHANDLER", "1")
    try:
        yield
    finally:
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        root.handlers[:] = ours + files
        root.setLevel(min(level, logging.INFO))
        try:
            import jax

            jax.config.update("jax_logging_level", None)  # drop JAX's own stderr handler; its records reach ours
        except Exception:  # noqa: BLE001 - older JAX without the option
            pass


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
