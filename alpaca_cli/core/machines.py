"""The machines a run can be planned for (`alpaca train --dry-run --target NAME`): device count, memory per device
and peak bfloat16 throughput, as the vendors publish them. The same table is in docs/planning.md.

A JAX device is what holds one shard: a TPU v2/v3 core (two per chip), a TPU v4/v5p chip (its two cores act as one,
"megacore"), a v5e chip, a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_cli.core.attention import Platform
from alpaca_cli.errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    platform: Platform
    devices: int
    hosts: int
    memory_gib: float
    """HBM per device."""
    peak_tflops: float
    """Dense bfloat16 matrix throughput per device (TFLOP/s)."""
    note: str = ""
    topology: str = ""
    """TPUs: the slice's chips as the TPU compiler names them ("v4:2x2x1"): what a deviceless XLA:TPU compile of
    the step targets (core/target_compile.py)."""

    @property
    def usable_gib(self) -> float:
        """What a training step may use per device: TPUs reserve about 0.5 GiB per core for the runtime; JAX on a
        GPU preallocates 75% of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION) and CUDA, cuBLAS and NCCL take about
        1 GiB of that."""
        if self.platform.kind == "tpu":
            return self.memory_gib - 0.5
        if self.platform.kind == "gpu":
            return 0.75 * self.memory_gib - 1.0
        return self.memory_gib


TPU_V3, TPU_V4, TPU_V5, TPU_V6 = Platform("tpu", 3), Platform("tpu", 4), Platform("tpu", 5), Platform("tpu", 6)
GPU = Platform("gpu")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("v3-8", TPU_V3, 8, 1, 16, 61.5, "8 cores of 4 chips (123 TFLOP/s per chip)", "v3:2x2"),
        Target("v3-32", TPU_V3, 32, 4, 16, 61.5, "the tutorial's pod slice: 4 hosts x 8 cores", "v3:4x4"),
        Target("v4-8", TPU_V4, 4, 1, 32, 275, "4 chips (megacore)", "v4:2x2x1"),
        Target("v4-32", TPU_V4, 16, 4, 32, 275, "16 chips on 4 hosts", "v4:2x2x4"),
        Target("v5e-8", TPU_V5, 8, 1, 16, 197, "8 chips (v5 lite)", "v5e:2x4"),
        Target("v5e-16", TPU_V5, 16, 4, 16, 197, "16 chips on 4 hosts", "v5e:4x4"),
        Target("v5p-8", TPU_V5, 4, 1, 95, 459, "4 chips (megacore)", "v5:2x2x1"),
        Target("1x24g", GPU, 1, 1, 24, 165, "one 24 GB GPU (RTX 4090 / L4 class; throughput of a 4090)"),
        Target("1xa100-40g", GPU, 1, 1, 40, 312),
        Target("1xa100-80g", GPU, 1, 1, 80, 312),
        Target("8xa100-40g", GPU, 8, 1, 40, 312),
        Target("8xa100-80g", GPU, 8, 1, 80, 312, "Stanford's machine"),
        Target("8xh100-80g", GPU, 8, 1, 80, 989, "SXM"),
        Target("1xh200", GPU, 1, 1, 140, 989, "141 GB (about 140 GiB usable by CUDA)"),
    )
}


@dataclass(frozen=True)
class TpuGeneration:
    """What a `tpu:GEN:AxBxC` target is made of: per chip, the JAX devices (v3: two cores; v4/v5p: one megacore;
    v5e/v6e: one core), HBM and bf16 TFLOP/s per device; and the hosts: a slice of up to `one_host_chips` chips is
    one host (v5e/v6e hosts hold 8), a larger one has 4 chips per host."""

    platform: Platform
    jax_name: str
    devices_per_chip: int
    memory_gib: float
    peak_tflops: float
    one_host_chips: int = 4


TPU_GENERATIONS = {
    "v3": TpuGeneration(TPU_V3, "v3", 2, 16, 61.5),
    "v4": TpuGeneration(TPU_V4, "v4", 1, 32, 275),
    "v5e": TpuGeneration(TPU_V5, "v5e", 1, 16, 197, one_host_chips=8),
    "v5p": TpuGeneration(TPU_V5, "v5", 1, 95, 459),
    "v6e": TpuGeneration(TPU_V6, "v6e", 1, 32, 918, one_host_chips=8),
}


def tpu_slice(name: str) -> Target:
    """`tpu:v5p:2x2x2`: any slice of a TPU generation, by its chip grid."""
    parts = name.split(":")
    gen = TPU_GENERATIONS.get(parts[1]) if len(parts) == 3 else None
    dims = parts[2].split("x") if len(parts) == 3 else []
    if gen is None or not 2 <= len(dims) <= 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ConfigError(f"--target {name!r}: a TPU slice is tpu:GENERATION:CHIPS, e.g. tpu:v5p:2x2x2 or "
                          f"tpu:v5e:4x4 (generations: {', '.join(TPU_GENERATIONS)})")
    chips = 1
    for d in dims:
        chips *= int(d)
    hosts = 1 if chips <= gen.one_host_chips else chips // 4
    return Target(name, gen.platform, chips * gen.devices_per_chip, hosts, gen.memory_gib, gen.peak_tflops,
                  f"{chips} chips", f"{gen.jax_name}:{parts[2]}")


def cpu_target(devices: int) -> Target:
    """The devices this process has, when they are CPUs (the plan without --target on a laptop or in tests)."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Target("cpu", Platform("cpu"), devices, 1, ram / devices, 0.5, "this machine's CPU (peak is a guess)")


def get(name: str) -> Target:
    if name == "cpu":
        return cpu_target(1)
    if name.startswith("tpu:"):
        return tpu_slice(name)
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r} is not a known machine; known: cpu, {', '.join(TARGETS)}, "
                          "or a TPU slice as tpu:v5p:2x2x2")
    return TARGETS[name]
