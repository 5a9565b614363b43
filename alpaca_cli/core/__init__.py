"""The importable core: plain functions over typed configs and a RunDir. No Typer, no printing."""

from alpaca_cli import compat

compat.patch_jax_on_import()  # as JAX is imported, before Haliax runs anything (a no-op on the pinned JAX)
