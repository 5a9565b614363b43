"""Newer JAX than the pinned one (0.10.0): what the pinned Haliax needs restored, in one place.

The GPU images we check on carry their own JAX (0.11.x, with its CUDA build), which cannot be swapped for the pin.
marin-haliax 0.2.20's `dot` (haliax/jax_utils.py:275) still calls `jax.core.is_constant_dim`, which jax 0.10
deprecates and jax 0.11 removed: on jax 0.11.2 training died there. `patch_jax()` puts back an equivalent (a
dimension is constant when it is a plain integer, not a tracer); on the pinned JAX it does nothing. Remove this
module when the pins move to a Haliax that no longer calls it.
"""

from __future__ import annotations

import operator
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
