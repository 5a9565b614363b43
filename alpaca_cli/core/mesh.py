"""Meshes outside the trainer (export, generate, eval, tests), with Levanter's axis names: this process's own
devices, or every process's (pod_mesh)."""

from __future__ import annotations

# On a pod, jax.devices()[0] belongs to process 0 (and Levanter's `local_cpu_mesh` makes Explicit axes, with which a
# forward pass over data-sharded weights raised ShardingTypeError): these meshes use jax.local_devices() and plain
# (auto) axes.
AXES = ("replica", "data", "model")
FSDP = {"embed": "data"}
"""Parameters split over the local devices along the embedding axis: no device holds the whole model."""
COMPUTE = {"batch": "data"}
"""Activations split by batch row, as the trainer computes (XLA gathers each layer's parameters): not by the
embedding axis, which Mixtral's expert routing (a shard_map that reshapes the hidden axis) cannot take."""


def local_mesh(all_devices: bool = False):
    """A mesh of this process's first device (or all its devices, for FSDP with `FSDP`)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.local_devices() if all_devices else jax.local_devices()[:1]
    return Mesh(np.array(devices).reshape(1, -1, 1), AXES)


def pod_mesh():
    """Every device of every process (a pod's hosts together), for work that all processes run in step: generate
    and eval on several hosts."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(1, -1, 1), AXES)
