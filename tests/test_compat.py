"""Newer JAX (the GPU images' 0.11.x): the one name the pinned Haliax needs is restored, and means what it meant."""

import subprocess
import sys

from helpers import cli_env

REMOVED = r"""
import jax, jax.core
original = jax.core.is_constant_dim
deprecated = getattr(jax.core, "__getattr__", None)   # jax 0.10 serves it (deprecated) through the module __getattr__
def removed(name):                                     # as in jax 0.11: removed
    if name == "is_constant_dim" or deprecated is None:
        raise AttributeError(name)
    return deprecated(name)
jax.core.__getattr__ = removed
jax.core.__dict__.pop("is_constant_dim", None)
assert not hasattr(jax.core, "is_constant_dim")
from alpaca_cli import compat
assert compat.patch_jax() is True and compat.patch_jax() is False
import haliax as hax, jax.numpy as jnp
A, B = hax.Axis("a", 3), hax.Axis("b", 4)
x = hax.ones((A, B))
print(float(jax.jit(lambda x: hax.dot(x, x, axis=B).array.sum())(x)))   # haliax's dot asks is_constant_dim
for d in (3, 0, jnp.int32(2), 2.5, "x", None):
    assert compat._is_constant_dim(d) == original(d), d
jax.jit(lambda y: [compat._is_constant_dim(y.shape[0]), compat._is_constant_dim(y.sum())])(jnp.ones(3))
print("same answers")
"""


def test_the_removed_jax_name_is_restored_for_haliax():
    out = subprocess.run([sys.executable, "-c", REMOVED], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["12.0", "same", "answers"]


def test_on_the_pinned_jax_nothing_is_patched():
    import jax

    from alpaca_cli import compat

    assert hasattr(jax.core, "is_constant_dim") and compat.patch_jax() is False


LAZY = r"""
import sys
from alpaca_cli import compat
calls = []
real = compat.patch_jax
compat.patch_jax = lambda: calls.append("patched") or real()
import alpaca_cli.core.parallel          # all a prepare worker imports
assert "jax" not in sys.modules, "importing the core imported JAX"
assert calls == [], calls
import importlib.util
assert importlib.util.find_spec("jax") is not None   # looked up, not imported (as transformers does): not yet
assert "jax" not in sys.modules and calls == [], calls
import haliax                            # imports JAX: patched then, before Haliax can call anything
assert calls == ["patched"], calls
import jax
assert hasattr(jax.core, "is_constant_dim")
print("patched on import")
"""


def test_the_patch_waits_for_jax_so_a_prepare_worker_never_loads_it():
    out = subprocess.run([sys.executable, "-c", LAZY], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "patched on import"
