"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. When that is inside a
garbage-collection callback (JAX registers one: jax/_src/lib/__init__.py, `_xla_gc_callback`), Python prints
"Exception ignored in ..." and drops the exception, and the command runs on as if nothing happened: seen as one
Ctrl-C in eight lost during `alpaca train` on a tiny model (it trained to the end and exited 0). The handler
installed here also records the request, and `check()`, called at safe points (every training step, every batch of
answers), raises it again.
"""

from __future__ import annotations

import signal
import threading

_requested = False


def _on_sigint(signum, frame):
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as Python does, and remember it (the console entry point calls this)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed (its first KeyboardInterrupt may have been swallowed)."""
    if _requested:
        raise KeyboardInterrupt
