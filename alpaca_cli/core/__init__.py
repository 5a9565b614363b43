"""The importable core: plain functions over typed configs and a RunDir. No Typer, no printing."""
