"""Multi-process JAX: initialisation, the one writer, barriers and broadcasts. On one host all of this is a no-op.

On a TPU pod slice JAX finds its peers by itself and on SLURM Levanter reads the environment; elsewhere (a GPU
cluster with another launcher, or several processes on one machine) the coordinator address, process count and
process id come from flags or ALPACA_COORDINATOR_ADDRESS / ALPACA_NUM_PROCESSES / ALPACA_PROCESS_ID.
Exactly one process (index 0) writes the shared files: manifest, cache, metrics, export, Hub upload.

If a process dies, JAX's coordination service notices its missing heartbeats and stops the others:
ALPACA_HEARTBEAT_TIMEOUT (seconds, default 100) bounds how long they wait.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

logger = logging.getLogger(__name__)

_initialized = False
_barriers: dict[str, int] = {}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Initialise jax.distributed once per process (no-op on a single host without a cluster)."""
    global _initialized
    if _initialized:
        return
    coordinator_address = coordinator_address or os.environ.get("ALPACA_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("ALPACA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("ALPACA_PROCESS_ID")

    import jax

    if coordinator_address:
        if num_processes is None or process_id is None:
            from alpaca_cli.errors import ConfigError

            raise ConfigError(
                "--coordinator-address needs --num-processes and --process-id "
                "(or ALPACA_NUM_PROCESSES and ALPACA_PROCESS_ID)"
            )
        if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
            # collectives between CPU processes (the tests, and CPU-only clusters) go through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=int(os.environ.get("ALPACA_INIT_TIMEOUT", "300")),
            heartbeat_timeout_seconds=int(os.environ.get("ALPACA_HEARTBEAT_TIMEOUT", "100")),
        )
        logger.info("process %d of %d (coordinator %s)", process_id, num_processes, coordinator_address)
    else:
        from levanter.distributed import DistributedConfig

        DistributedConfig().initialize()  # TPU pod slices and SLURM are detected here
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


def barrier(name: str, timeout_s: float = 6 * 3600) -> None:
    """Wait until every process reaches this point (no-op on one process).

    Through the coordination service (as `broadcast` is), not a device collective: collectives between CPU processes
    go through gloo, which gives a peer a fixed 30 s to join. Called before work that starts a new collective
    (the first training step, say), it lets every process start it at the same time however long the others took to
    get there."""
    if process_count() <= 1:
        return
    import jax._src.distributed as jax_distributed  # the coordination client (what Levanter's barrier_sync uses)

    _barriers[name] = _barriers.get(name, 0) + 1
    jax_distributed.global_state.client.wait_at_barrier(
        f"alpaca-{name}-{_barriers[name]}", timeout_in_ms=int(timeout_s * 1000)
    )


def broadcast(obj: Any, timeout_s: float = 6 * 3600) -> Any:
    """Process 0's value of a JSON-able object, on every process."""
    if process_count() <= 1:
        return obj
    from levanter.utils.jax_utils import multihost_broadcast_sync

    return multihost_broadcast_sync(obj, is_source=is_writer(), timeout=timeout_s)


def on_writer(fn: Callable[[], Any], encode: Callable[[Any], Any] = lambda x: x, decode: Callable[[Any], Any] = lambda x: x):
    """Run fn on process 0 only; every process gets its (encoded/decoded) result, or raises the same error."""
    from alpaca_cli import errors

    if process_count() <= 1:
        return fn()
    outcome: dict = {}
    result = None
    if is_writer():
        try:
            result = fn()
            outcome = {"ok": encode(result)}
        except errors.AlpacaError as e:
            outcome = {"error": e.message, "hint": e.hint, "type": type(e).__name__}
            broadcast(outcome)
            raise
        except BaseException as e:
            broadcast({"error": f"process 0 failed: {type(e).__name__}: {e}", "hint": None, "type": "AlpacaError"})
            raise
    outcome = broadcast(outcome)
    if "error" in outcome:
        cls = getattr(errors, outcome["type"], errors.AlpacaError)
        err = cls.__new__(cls)
        errors.AlpacaError.__init__(err, outcome["error"], outcome.get("hint"))
        if isinstance(err, errors.ConfigError):
            err.problems = [outcome["error"]]
        raise err
    return result if is_writer() else decode(outcome["ok"])
