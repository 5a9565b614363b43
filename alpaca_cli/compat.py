"""Newer JAX than the pinned one (0.10.0): what the pinned Haliax needs restored, in one place.

The GPU images we check on carry their own JAX (0.11.x, with its CUDA build), which cannot be swapped for the pin.
marin-haliax 0.2.20's `dot` (haliax/jax_utils.py:275) still calls `jax.core.is_constant_dim`, which jax 0.10
deprecates and jax 0.11 removed: on jax 0.11.2 training died there. `patch_jax()` puts back an equivalent (a
dimension is constant when it is a plain integer, not a tracer); on the pinned JAX it does nothing. Remove this
module when the pins move to a Haliax that no longer calls it.

`patch_jax_on_import()` (what alpaca_cli.core runs) applies it as JAX is imported, not before: a process that never
imports JAX (a prepare worker: a second and about 150 MB spared in each, on every core) does not load it for this.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import operator
import sys
import warnings


def _is_constant_dim(d) -> bool:
    try:
        import jax

        if isinstance(d, jax.core.Tracer):
            return False
        operator.index(d)
        return True
    except Exception:  # noqa: BLE001 - the removed function's own rule: anything else is not a constant
        return False


def patch_jax() -> bool:
    """Restore what the pinned Haliax uses and this JAX lacks. Returns whether anything was restored."""
    import jax

    with warnings.catch_warnings():  # jax 0.10 still has it, deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(jax.core, "is_constant_dim"):
            return False
    jax.core.is_constant_dim = _is_constant_dim
    return True


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds `jax` as the import system would, and runs patch_jax() once its module has run; it stays in place until
    then (transformers and datasets look JAX up with importlib.util.find_spec without importing it)."""

    _looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "jax" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec("jax")
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_then_patch(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            patch_jax()

        spec.loader.exec_module = run_then_patch  # this spec's own loader object: nothing else is changed
        return spec


def patch_jax_on_import() -> None:
    """patch_jax() now if JAX is imported, else right after the first `import jax` (before anything can use it)."""
    if "jax" in sys.modules:
        patch_jax()
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
