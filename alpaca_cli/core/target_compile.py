"""The training step compiled ahead of time for a target machine (`alpaca train --dry-run --target NAME`, the
plan's "compiled" part): the real step, for the target's device count on simulated CPU devices, with abstract
inputs: nothing is allocated (a 7B model's 27 GB of weights are never read, let alone materialised), and XLA says
what each device would hold.

What is compiled is Levanter's own step (`Trainer._jit_train_step_fn_no_hook`) for our loss and packed rows, the
trainer state's shape from `eqx.filter_eval_shape` of what `Trainer.initial_state` runs, each leaf carrying the
sharding the real run gives it (without them XLA cannot reuse the donated state and over-counts). The step's
per-device memory is XLA's `memory_analysis()`: arguments + outputs - aliased (reused) + temporaries.

How far a CPU compile predicts a TPU or GPU (docs/planning.md has the measurements): XLA:CPU computes bfloat16
matrix products in float32 (saved activations twice the size), and the TPU compiler works harder at fitting when
memory is tight; CPU totals were 1.3-1.6x what TPU compiles of the same step needed, temporaries up to 2.4x. So the
verdict keeps a margin: `fits` when the CPU figure is within 90% of what the target can use; `does not fit` when
even the arguments plus 40% of the temporaries (the lowest TPU/CPU ratio seen: 0.42) exceed it; `borderline`
between, with the numbers.

With libtpu installed (`pip install 'alpaca[plan]'`), a TPU target's step is compiled by XLA:TPU itself,
deviceless: the same step, on a mesh of the slice's devices as `jax.experimental.topologies` describes them (no TPU
needed, as MaxText's train_compile.py does), so the memory figures are the TPU's own and the verdict has no margin;
splash attention is lowered for real (Pallas/Mosaic), so a block the kernel rejects fails here. XLA:TPU refuses to
compile a program that does not fit the chip's HBM; its message says how much the step needs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

from alpaca_cli.core.machines import Target

FITS, BORDERLINE, DOES_NOT_FIT = "fits", "borderline", "does not fit"
XLA_CPU, XLA_TPU = "XLA:CPU", "XLA:TPU"
PLAN_INSTALL = "pip install 'alpaca[plan]'"
FIT_MARGIN = 0.9
TEMP_FLOOR = 0.4


@dataclass
class CompiledStep:
    arguments_gib: float
    outputs_gib: float
    aliased_gib: float
    temporaries_gib: float
    flops_per_device: float
    """Matrix-product FLOPs of one step on one device, from the compiled program (loop bodies times their trip
    counts: XLA's cost_analysis counts each scanned layer once)."""
    compile_seconds: float
    upcast_gib: float = 0.0
    """Float32 copies XLA:CPU makes of the 16-bit arguments (LoRA's frozen bfloat16 base) to multiply them: CPUs
    have no bfloat16 matrix unit; TPUs and GPUs multiply bfloat16 as it is, so these are not on an accelerator."""
    compiler: str = XLA_CPU
    """XLA:TPU (deviceless, for the target's topology) or XLA:CPU (simulated devices: an estimate)."""
    needed_gib: float | None = None
    """XLA:TPU only, when it refused the program for the chip's HBM: what its message says the step needs."""

    @property
    def total_gib(self) -> float:
        if self.needed_gib is not None:
            return self.needed_gib
        return self.arguments_gib + self.outputs_gib - self.aliased_gib + self.temporaries_gib

    @property
    def accelerator_temporaries_gib(self) -> float:
        return max(0.0, self.temporaries_gib - self.upcast_gib)

    @property
    def accelerator_total_gib(self) -> float:
        return self.total_gib - (self.temporaries_gib - self.accelerator_temporaries_gib)


def simulate_devices(n: int) -> None:
    """Make JAX start with n CPU devices (before anything starts its backend; the CLI calls this first thing)."""
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])


def check_devices(target: Target) -> None:
    import jax

    from alpaca_cli.errors import ConfigError

    if jax.device_count() != target.devices or jax.devices()[0].platform != "cpu":
        raise ConfigError(
            f"--target {target.name} needs {target.devices} simulated CPU devices, and this process already started "
            f"JAX with {jax.device_count()} {jax.devices()[0].platform} device(s)",
            hint="run `alpaca train --dry-run --target ...` as its own command",
        )


def tpu_compiler_available() -> bool:
    """Whether XLA:TPU can compile here: libtpu installed (the `plan` extra); no TPU is needed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def uses_tpu_compiler(target: Target) -> bool:
    """XLA:TPU for a TPU target when libtpu is installed, unless ALPACA_PLAN_COMPILER=cpu asks for the (faster)
    XLA:CPU estimate."""
    import os

    if os.environ.get("ALPACA_PLAN_COMPILER", "").lower() == "cpu":
        return False
    return target.platform.kind == "tpu" and bool(target.topology) and tpu_compiler_available()


def compiler_line(target: Target, compiler: str) -> str:
    """Which compiler produced the plan, in one line (the plan's "compiled by" row)."""
    if compiler == XLA_TPU:
        return f"compiled by XLA:TPU for {target.name} ({target.topology.split(':', 1)[1]}), deviceless"
    line = f"estimated with XLA:CPU on {target.devices} simulated devices"
    if target.platform.kind == "tpu" and not tpu_compiler_available():
        line += f"; for XLA:TPU's own figures (no TPU needed): {PLAN_INSTALL}"
    return line


def tpu_devices(target: Target) -> list:
    """The devices of the target's slice as libtpu describes them (deviceless: nothing is attached)."""
    import os

    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile, so that one process owns a TPU; a deviceless compile owns none, and two
    # plans at once (tests on two workers, a benchmark's parts) would otherwise fail on the lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    gen, grid = target.topology.split(":", 1)
    dims = [int(d) for d in grid.split("x")]
    dims += [1] * (3 - len(dims))
    # one host holds the whole slice, or 2x2x1 chips of it (machines.TpuGeneration.one_host_chips)
    bounds = tuple(dims) if target.hosts == 1 else tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
    desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                        chip_config_name="megacore" if gen in ("v4", "v5") else "default",
                                        chips_per_host_bounds=bounds, num_slices=1, wrap=(False, False, False))
    devices = list(desc.devices)
    if len(devices) != target.devices:
        raise RuntimeError(f"libtpu describes {target.topology} with {len(devices)} devices, the target table "
                           f"{target.devices}: fix alpaca_cli/core/machines.py")
    return devices


def compile_step(cfg, plan, lev_config, vocab: int, target: Target, trainer_config, lora_record=None) -> CompiledStep:
    """Lower and compile the sharded training step for `plan`'s rows on the target's devices: the slice's own
    (XLA:TPU, deviceless) when libtpu is installed and the target is a TPU, else simulated CPU devices."""
    from levanter.layers.attention import AttentionBackend

    tpu = uses_tpu_compiler(target)
    if lev_config.attn_backend == AttentionBackend.SPLASH and not tpu:
        # a TPU Pallas kernel cannot be compiled for CPU; Levanter's JAX flash attention with the same blocks is
        # the stand-in (both blockwise: neither materialises [row, row] scores)
        lev_config = dataclasses.replace(lev_config, attn_backend=AttentionBackend.JAX_FLASH)
    trainer_config._initialize_jax_config()
    trainer_config._validate_and_set_defaults()
    pdp = trainer_config.per_device_parallelism
    accum = max(1, trainer_config.train_batch_size // (pdp * trainer_config.data_axis_size))
    t0 = time.time()
    try:
        with _mesh_of(tpu_devices(target) if tpu else None):
            lowered, half = _lower(cfg, plan, lev_config, vocab, trainer_config, lora_record, accum)
            compiled = lowered.compile()
    except Exception as e:
        if not tpu:
            raise
        return _tpu_refusal(e, lev_config, time.time() - t0)
    mem = compiled.memory_analysis()
    gib = 2.0**30
    return CompiledStep(
        arguments_gib=mem.argument_size_in_bytes / gib,
        outputs_gib=mem.output_size_in_bytes / gib,
        aliased_gib=mem.alias_size_in_bytes / gib,
        temporaries_gib=mem.temp_size_in_bytes / gib,
        # XLA:TPU writes its matrix products as convolutions with windows this count does not read: on TPU it
        # counts the program as lowered for the slice, before partitioning (all devices), over the devices
        flops_per_device=(hlo_matmul_flops(lowered.as_text(dialect="hlo")) / target.devices if tpu
                          else hlo_matmul_flops(compiled.as_text())),
        compile_seconds=time.time() - t0,
        upcast_gib=(2 * half / gib) if target.platform.kind != "cpu" and not tpu else 0.0,
        compiler=XLA_TPU if tpu else XLA_CPU,
    )


def _lower(cfg, plan, lev_config, vocab, trainer_config, lora_record, accum):
    """The lowered step, and the per-device bytes of the state's 16-bit leaves."""
    import equinox as eqx
    import haliax as hax
    import haliax.partitioning as hpart
    import jax
    import jax.numpy as jnp
    import jax.random as jrandom
    from levanter.trainer import Trainer
    from levanter.trainer_state import TrainerState

    from alpaca_cli.core.batches import PackedRow, make_loss_fn

    optimizer = cfg.optimizer.build(plan.steps)
    _, model_key, training_key = jrandom.split(jrandom.PRNGKey(0), 3)
    with Trainer(trainer_config, optimizer, make_loss_fn(vocab, accum_steps=accum), add_default_hooks=False) as trainer:
        mesh, params, compute = trainer.device_mesh, trainer.parameter_axis_mapping, trainer.compute_axis_mapping
        Vocab = hpart.round_axis_for_partitioning(hax.Axis("vocab", vocab), params)

        def init_state(model_init, key):  # what Trainer.initial_state initialises (or restores)
            model = model_init()
            trainable = True
            if lora_record is not None:  # adapters trained, the base frozen (cast to the compute dtype)
                from alpaca_cli.core import lora

                model = lora.add_adapters(model, lora_record, model_key)
                trainable = lora.trainable(model)
            return TrainerState.init(trainer.optimizer, model, key=key, is_trainable=trainable, mp=trainer.mp,
                                     quantization=trainer.config.quantization,
                                     model_averaging=trainer.config.model_averaging)

        state = eqx.filter_eval_shape(init_state, lambda: lev_config.build(Vocab, key=model_key), training_key)
        state = _with_shardings(state, hpart.infer_resource_partitions(state, params, mesh=mesh))
        half = sum(_per_device_bytes(x) for x in jax.tree_util.tree_leaves(state)
                   if isinstance(x, jax.ShapeDtypeStruct) and x.dtype.itemsize == 2)
        B, Pos = trainer.TrainBatch, lev_config.max_Pos
        row = PackedRow(*(hax.NamedArray(jax.ShapeDtypeStruct((B.size, Pos.size), dt), (B, Pos))
                          for dt in (jnp.int32, jnp.float32, jnp.int32, jnp.int32)))
        row = _with_shardings(row, hpart.infer_resource_partitions(row, compute, mesh=mesh))
        with _shapes_count_as_arrays(hpart):
            return trainer._jit_train_step_fn_no_hook.lower(state, (row,), {}), half


_HBM_OOM = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm")


def _tpu_refusal(e: Exception, lev_config, seconds: float) -> CompiledStep:
    """XLA:TPU's refusal as a plan (a step that does not fit the chip's HBM) or one line (a kernel it rejects)."""
    from levanter.layers.attention import AttentionBackend

    from alpaca_cli.errors import ConfigError, first_line

    text = str(e)
    m = _HBM_OOM.search(text)
    if m:
        scale = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0, "T": 2.0**10, None: 2.0**-30}
        need = float(m.group(1)) * scale[m.group(2)]
        return CompiledStep(0.0, 0.0, 0.0, 0.0, 0.0, seconds, compiler=XLA_TPU, needed_gib=need)
    kernel = any(w in text.lower() for w in ("splash", "mosaic", "pallas"))
    if kernel and lev_config.attn_backend == AttentionBackend.SPLASH:
        from alpaca_cli.core.attention import LANES, SPLASH_BLOCKS, largest_dividing, nearest_lengths

        row, block = lev_config.max_seq_len, lev_config.flash_attention_block_size or SPLASH_BLOCKS[0]
        raise ConfigError(f"--seq-len {row} does not compile with splash attention and {block}-token blocks on "
                          f"XLA:TPU ({first_line(e, 200) or type(e).__name__}); nearest lengths that work: "
                          f"{nearest_lengths(row, LANES if row % LANES else block)}",
                          hint=f"or --attention-block {largest_dividing(row, SPLASH_BLOCKS) or 'N'}") from e
    raise e


class _mesh_of:
    """Levanter builds the trainer's mesh from jax.devices() (the simulated CPUs, as many as the target has); for a
    deviceless XLA:TPU compile it is built from the slice's devices instead (the same axes and shape). Nothing can
    run eagerly on those devices: haliax asks "am I in jit?" by running jnp.zeros (here: JAX's trace state), and
    Levanter's rotary embeddings compute their constants eagerly (jax.ensure_compile_time_eval; here: in the
    program, where XLA folds them)."""

    def __init__(self, devices):
        self.devices = devices

    def __enter__(self):
        import contextlib
        import functools

        import haliax.partitioning as hpart
        import jax
        import levanter.trainer as lt
        from jax._src import core

        self.saved = lt.create_mesh_from_axis_specs, hpart.is_in_jit, jax.ensure_compile_time_eval
        if self.devices is not None:
            lt.create_mesh_from_axis_specs = functools.partial(self.saved[0], devices=self.devices)
            hpart.is_in_jit = lambda: not core.trace_state_clean()
            jax.ensure_compile_time_eval = contextlib.nullcontext

    def __exit__(self, *exc):
        import haliax.partitioning as hpart
        import jax
        import levanter.trainer as lt

        lt.create_mesh_from_axis_specs, hpart.is_in_jit, jax.ensure_compile_time_eval = self.saved


def verdict(step: CompiledStep, target: Target) -> tuple[str, str]:
    """(fits | borderline | does not fit, one line saying so with the numbers)."""
    usable = target.usable_gib
    need = step.accelerator_total_gib
    if step.compiler == XLA_TPU:
        return _tpu_verdict(step, target)
    at_least = step.arguments_gib + TEMP_FLOOR * step.accelerator_temporaries_gib
    where = f"{target.name} ({target.memory_gib:g} GiB per device, {usable:.1f} usable)"
    upcast = (f", leaving out the {step.upcast_gib:.1f} GiB of float32 copies of bfloat16 weights only XLA:CPU makes"
              if step.upcast_gib else "")
    if need <= FIT_MARGIN * usable:
        return FITS, f"fits {where}: {need:.1f} GiB per device (XLA:CPU{upcast})"
    if at_least > usable:
        return DOES_NOT_FIT, (f"does not fit {where}: {need:.1f} GiB per device (XLA:CPU{upcast}), at least "
                              f"{at_least:.1f} on the accelerator; use fewer rows per device (--per-device-rows), "
                              f"more devices, --remat, or a shorter --seq-len")
    return BORDERLINE, (f"borderline on {where}: {need:.1f} GiB per device on XLA:CPU{upcast}, which over-estimates "
                        f"accelerators (at least {at_least:.1f}); try --per-device-rows lower to be sure")


def _tpu_verdict(step: CompiledStep, target: Target) -> tuple[str, str]:
    """XLA:TPU's answer is the chip's own, no margin: it refuses a program that does not fit the chip's HBM. Its
    buffers' sum (arguments + outputs - aliased + temporaries) can exceed what the chip can use while the program,
    whose buffers do not all live at once, is placed: it fits, with little room, and says so."""
    usable = target.usable_gib
    where = f"{target.name} ({target.memory_gib:g} GiB per device, {usable:.1f} usable)"
    if step.needed_gib is None:
        room = "" if step.total_gib <= usable else (
            "; the buffers add up to more than the usable memory and XLA:TPU still placed them: little room")
        return FITS, f"fits {where}: {step.total_gib:.1f} GiB per device (XLA:TPU{room})"
    return DOES_NOT_FIT, (f"does not fit {where}: at least {step.total_gib:.1f} GiB per device (XLA:TPU refused to "
                          f"compile it for the chip's HBM); use fewer rows per device (--per-device-rows), more "
                          f"devices, --remat, or a shorter --seq-len")


def _per_device_bytes(x) -> int:
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(math.prod(shard)) * x.dtype.itemsize


def model_flops_per_step(params: int, lev_config, tokens: int) -> float:
    """The standard model FLOPs of a training step (forward and backward): 6 x parameters x tokens, plus causal
    attention's 6 x layers x row x attention width per token. What MFU is measured against (no recomputation)."""
    layers = getattr(lev_config, "num_layers", 0) or 0
    heads = getattr(lev_config, "num_heads", 0) or 0
    head_dim = getattr(lev_config, "head_dim", None) or (lev_config.hidden_dim // max(heads, 1))
    return 6.0 * params * tokens + 6.0 * layers * lev_config.max_seq_len * heads * head_dim * tokens


def _with_shardings(shape_tree, sharding_tree):
    """ShapeDtypeStructs (bare or inside NamedArrays) carrying the given shardings."""
    import haliax as hax
    import jax

    def one(x, s):
        if isinstance(x, hax.NamedArray) and isinstance(x.array, jax.ShapeDtypeStruct):
            return hax.NamedArray(jax.ShapeDtypeStruct(x.array.shape, x.array.dtype, sharding=s), x.axes)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return x

    return jax.tree_util.tree_map(one, shape_tree, sharding_tree, is_leaf=lambda v: isinstance(v, hax.NamedArray))


class _shapes_count_as_arrays:
    """haliax's named_jit splits its arguments with equinox.is_array, which is False for a ShapeDtypeStruct: the
    abstract state would be taken for static values. While lowering, shapes count as arrays (as in jax.jit)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        import equinox as eqx
        import jax

        if not hasattr(self.module, "is_array"):
            raise RuntimeError("haliax.partitioning.is_array is gone: revisit alpaca_cli/core/target_compile.py")
        self.saved = self.module.is_array
        self.module.is_array = lambda x: isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x)

    def __exit__(self, *exc):
        self.module.is_array = self.saved


# -- FLOPs of a compiled program -------------------------------------------------------------------------------------

_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->\s*.*)?\{\s*$")
_INST = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^([a-z]\w*)\[([\d,]*)\]")
_REDUCERS = ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map", "all-reduce",
             "all-reduce-start", "reduce-scatter")


def hlo_matmul_flops(text: str) -> float:
    """FLOPs of the dot products (and convolutions) of an HLO module (optimized: one device's program; as lowered:
    all devices'), fusions and calls followed, while-loop bodies counted `known_trip_count` times (XLA:CPU) or as
    many times as the condition's bound says (as lowered), a conditional's costliest branch."""
    comps, entry = _hlo_computations(text)
    dims, operands = _hlo_dims, _hlo_operands

    def bound(cond: str) -> int:
        """No known_trip_count: a counter from 0 compared `LT` with a constant in the condition."""
        insts = comps.get(cond, [])
        consts = {name: re.match(r"\s*(\d+)\)", rest) for name, _, op, rest in insts if op == "constant"}
        for _, _, op, rest in insts:
            if op == "compare" and "direction=LT" in rest:
                found = [consts[o] for o in operands(rest) if consts.get(o)]
                if found:
                    return int(found[0].group(1))
        return 1

    @lru_cache(maxsize=None)
    def flops(comp: str) -> float:
        total = 0.0
        shapes = {name: shape for name, shape, _, _ in comps.get(comp, [])}
        for _, shape, op, rest in comps.get(comp, []):
            if op == "dot":
                out, ops = dims(shape), operands(rest)
                lhs = dims(shapes.get(ops[0], "")) if ops else None
                mc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if out is not None and lhs is not None and mc:
                    total += 2.0 * math.prod(out) * math.prod(lhs[int(d)] for d in mc.group(1).split(",") if d)
            elif op == "convolution":
                out, ops = dims(shape), operands(rest)
                rhs = dims(shapes.get(ops[1], "")) if len(ops) > 1 else None
                ml = re.search(r"dim_labels=\w+_(\w+)->", rest)
                if out is not None and rhs is not None and ml:
                    total += 2.0 * math.prod(out) * math.prod(d for d, lab in zip(rhs, ml.group(1)) if lab != "o")
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                cond = re.search(r"condition=%?([\w.\-]+)", rest)
                n = int(trip.group(1)) if trip else (bound(cond.group(1)) if cond else 1)
                if body:
                    total += n * flops(body.group(1))
            elif op == "conditional":
                mb = re.search(r"branch_computations=\{([^}]*)\}", rest)
                if mb:
                    total += max(flops(b.strip().lstrip("%")) for b in mb.group(1).split(","))
            elif op not in _REDUCERS:
                for key in ("calls", "to_apply"):
                    for mc in re.finditer(key + r"=%?([\w.\-]+)", rest):
                        total += flops(mc.group(1))
        return total

    return flops(entry) if entry else 0.0


def _hlo_computations(text: str) -> tuple[dict[str, list], str | None]:
    """{computation: [(name, shape, op, rest of the line)]} and the entry computation's name."""
    comps: dict[str, list] = {}
    entry = current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        mi = _INST.match(line)
        if mi:
            comps[current].append((mi.group(2), mi.group(3), mi.group(4), mi.group(5)))
    return comps, entry


def _hlo_dims(shape: str):
    m = _SHAPE.match(shape.strip())
    return [int(d) for d in m.group(2).split(",") if d] if m else None


def _hlo_operands(rest: str) -> list[str]:
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    names = rest[:end]
    if "%" in names:  # optimized HLO: %name (with or without its shape)
        return re.findall(r"%([\w.\-]+)", names)
    return [n.strip() for n in names.split(",") if n.strip()]  # as lowered: bare names


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="alpaca-plan-")
