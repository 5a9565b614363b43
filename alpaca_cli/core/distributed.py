"""Multi-process JAX: initialisation, the one writer, and barriers. On one host all of this is a no-op.

On a TPU pod slice JAX finds its peers by itself; on GPU clusters SLURM's environment, or the coordinator address,
process count and process id (flags or ALPACA_COORDINATOR_ADDRESS / ALPACA_NUM_PROCESSES / ALPACA_PROCESS_ID),
say how. Exactly one process (index 0) writes the shared files: manifest, cache, metrics, export, Hub upload.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_initialized = False


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Initialise jax.distributed once per process (Levanter's DistributedConfig does the detection)."""
    global _initialized
    if _initialized:
        return
    coordinator_address = coordinator_address or os.environ.get("ALPACA_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("ALPACA_NUM_PROCESSES"):
        num_processes = int(os.environ["ALPACA_NUM_PROCESSES"])
    if process_id is None and os.environ.get("ALPACA_PROCESS_ID"):
        process_id = int(os.environ["ALPACA_PROCESS_ID"])

    import jax
    from levanter.distributed import DistributedConfig

    if coordinator_address and (jax.config.jax_platforms or "").startswith("cpu") or os.environ.get(
        "JAX_PLATFORMS", ""
    ).startswith("cpu"):
        # collectives between CPU processes (tests, and CPU-only clusters) go through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    DistributedConfig(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    ).initialize()
    _initialized = True


def process_index() -> int:
    if not _initialized:
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    if not _initialized:
        return 1
    import jax

    return jax.process_count()


def is_writer() -> bool:
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process)."""
    if process_count() <= 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
