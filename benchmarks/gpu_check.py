#!/usr/bin/env python
"""The GPU check: what runs, how fast, and in how much memory, on one GPU, in one call (benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py OUTDIR            # on the GPU: 7B-width Llama, 8 layers (about 8 minutes at most)
    python benchmarks/gpu_check.py OUTDIR --cpu      # the same script end to end on CPU with a tiny model (~3 min on 2 cores)

Writes OUTDIR/gpu_check.json, OUTDIR/gpu_check.md and the parts' logs (OUTDIR/gpu_check.log). Every part runs in
its own process (a GPU's peak memory is per process; the plan compiles on simulated CPU devices, beside the GPU's
parts) with its own time limit, all within --budget; a part that fails is recorded with its error and the others
still run; the exit status is 1 when any part failed.

The parts:
- env: versions (Python, JAX and its devices, Levanter, Haliax, torch, transformers) and whether alpaca_cli.compat
  restored anything in this JAX.
- data: `alpaca prepare`'s own code on the Alpaca records (--data, --tokenizer; by default the shared 999 records
  and the Llama-2-style tokenizer when gpu_wheels.sh carried them, else the package's embedded demo), packed into
  rows of --seq-len with training's own packing (Levanter's pack_documents).
- packing: which attention kernel `alpaca train` picks here (core/attention.choose), run on rows of 1024 and 1536
  tokens holding several examples, against each example alone: packed logits must equal unpacked ones within
  bfloat16's rounding (measured as the gap between a float32 and a bfloat16 run of the same example).
- train (remat off, on): Levanter's Trainer with `alpaca train`'s loss (core/batches.py) on the packed rows, a
  Llama at 7B width (hidden 4096, MLP 11008, 32 heads, 32k vocabulary) with --layers layers, float32 parameters and
  Adam state, bfloat16 compute (the recipe's mp policy); tokens/s and MFU over the steps after the first two; peak
  GPU memory (the allocator's peak_bytes_in_use) and the GPU compiler's own memory analysis of the step.
- plan (remat off, on): `alpaca train --dry-run --target`'s compiled plan (core/target_compile.compile_step) for the
  same model, rows and trainer, on one simulated CPU device: its per-device memory, next to the measured peak.
- torch (remat off, on): the same model (Levanter's config turned into transformers' LlamaConfig) in transformers +
  torch on the same device, Stanford's recipe: float32 weights, bfloat16 autocast, AdamW, microbatches of 4
  examples padded to the longest, gradient accumulation over the same examples as each JAX step; "remat on" is
  transformers' gradient checkpointing.

Tokens/s counts the tokens of the examples (not padding); MFU is 6 x parameters x those tokens plus attention
(target_compile.model_flops_per_step) over the elapsed time and the device's peak bfloat16 FLOP/s (core/machines.py),
for both frameworks alike. Speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRIED = os.path.join(REPO, ".gpu", "data")  # what gpu_wheels.sh copies from ../shared, when it is there

SIZES = {
    # the model trained and timed: Llama-2-7B's width; layers as many as the time allows (--layers)
    "gpu": dict(hidden_dim=4096, intermediate_dim=11008, num_heads=32, num_kv_heads=32, num_layers=8, vocab=32000,
                seq_len=512, rows=32, warmup=2, steps=8, micro=4,
                packing=dict(hidden_dim=1024, intermediate_dim=2816, num_heads=8, num_kv_heads=8, num_layers=4)),
    "cpu": dict(hidden_dim=64, intermediate_dim=176, num_heads=4, num_kv_heads=4, num_layers=2, vocab=0,
                seq_len=512, rows=2, warmup=1, steps=2, micro=4,
                packing=dict(hidden_dim=64, intermediate_dim=176, num_heads=4, num_kv_heads=4, num_layers=2)),
}
PARTS = [  # (name, argument, seconds allowed on the GPU, on CPU)
    ("env", None, 60, 60),
    ("data", None, 90, 120),
    ("packing", None, 90, 180),
    ("train", "off", 150, 180),
    ("train", "on", 150, 180),
    ("plan", "off", 200, 180),
    ("plan", "on", 200, 180),
    ("torch", "off", 90, 120),
    ("torch", "on", 90, 120),
]
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0,  # dense bf16, per device
               "TPU v3": 61.5, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0}  # a TPU v3 device is one core; v4/v5p one megacore chip (tpu_check.sh)


# -- shared by the parts ----------------------------------------------------------------------------------------------


def sizes(a) -> dict:
    s = dict(SIZES["cpu" if a.cpu else "gpu"])
    if a.layers:
        s["num_layers"] = a.layers
    if a.rows:
        s["rows"] = a.rows
    if a.steps:
        s["steps"] = a.steps
    return s


def load_data(a) -> dict:
    import numpy as np

    with np.load(os.path.join(a.work, "data.npz")) as z:
        return {k: z[k] for k in z.files}


def example(d, i):
    lo, hi = int(d["offsets"][i]), int(d["offsets"][i + 1])
    return d["ids"][lo:hi], d["targets"][lo:hi]


def step_rows(d, s, step: int) -> list:
    """The example ids of each row of optimizer step `step` (rows taken in order, wrapping around)."""
    n = len(d["row_offsets"]) - 1
    out = []
    for r in range(step * s["rows"], (step + 1) * s["rows"]):
        r %= n
        out.append(d["row_members"][int(d["row_offsets"][r]) : int(d["row_offsets"][r + 1])])
    return out


def llama_config(s, dims: dict, seq_len: int, remat: bool, choice):
    from levanter.models.llama import LlamaConfig

    from alpaca_cli.core.attention import levanter_fields

    import dataclasses

    cfg = LlamaConfig(max_seq_len=seq_len, hidden_dim=dims["hidden_dim"], intermediate_dim=dims["intermediate_dim"],
                      num_layers=dims["num_layers"], num_heads=dims["num_heads"], num_kv_heads=dims["num_kv_heads"])
    return dataclasses.replace(cfg, **levanter_fields(choice, remat, cfg))


def vocab_size(s, d) -> int:
    return max(int(d["vocab"]), s["vocab"])


def trainer_config(s, work: str, steps: int):
    """The recipe's TrainerConfig (train_config.TrainConfig's defaults) for s['rows'] rows per step over the devices
    (one GPU; a TPU host's chips, tpu_check.sh)."""
    import dataclasses
    from pathlib import Path

    import jax

    from levanter.checkpoint import CheckpointerConfig
    from levanter.distributed import DistributedConfig
    from levanter.tracker.tracker import NoopConfig

    from alpaca_cli.train_config import TrainConfig

    base = TrainConfig().trainer
    return dataclasses.replace(
        base, id="gpu-check", train_batch_size=s["rows"],
        per_device_parallelism=max(1, s["rows"] // jax.device_count()), num_train_steps=steps,
        tracker=NoopConfig(), require_accelerator=False,
        distributed=DistributedConfig(initialize_jax_distributed=False), log_dir=Path(work) / "logs",
        checkpointer=CheckpointerConfig(base_path=os.path.join(work, "checkpoints")), log_jaxprs=False,
        log_xla_hlo=False,
    )


def device_peak_tflops(device) -> float | None:
    kind = str(getattr(device, "device_kind", ""))
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops
    return None


def mfu(params: int, lev_config, tokens_per_second: float, peak_tflops: float | None) -> float | None:
    from alpaca_cli.core.target_compile import model_flops_per_step

    if not peak_tflops:
        return None
    return model_flops_per_step(params, lev_config, tokens_per_second) / (peak_tflops * 1e12)


def gib(x) -> float | None:
    return None if x is None else round(x / 2**30, 3)


# -- the parts -------------------------------------------------------------------------------------------------------


def part_env(a) -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "levanter", "haliax", "equinox", "torch", "transformers", "numpy"):
        for dist in (f"marin-{name}", name) if name in ("levanter", "haliax") else (name,):
            try:
                out[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                out[name] = None
    import jax

    had = hasattr(jax.core, "is_constant_dim")
    import alpaca_cli.core  # noqa: F401 - applies alpaca_cli.compat.patch_jax() (JAX is imported)

    out["compat_restored_is_constant_dim"] = not had
    d = jax.devices()[0]
    out.update(platform=d.platform, device_kind=str(getattr(d, "device_kind", "")), devices=jax.device_count())
    try:
        import torch

        out["torch_cuda"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def part_data(a) -> dict:
    import numpy as np

    from alpaca_cli.config import PrepareConfig
    from alpaca_cli.core import cache as cachemod
    from alpaca_cli.core.plan import pack_rows
    from alpaca_cli.core.prepare import prepare
    from alpaca_cli.rundir import open_run

    s = sizes(a)
    run = open_run(os.path.join(a.work, "run"), create=True)
    t0 = time.time()
    prepare(PrepareConfig(data=a.data, tokenizer=a.tokenizer, max_length=s["seq_len"]), run)
    seconds = time.time() - t0
    c = cachemod.open_cache(run.cache_dir)
    ids, targets, offsets = [], [], [0]
    for row in c.rows(range(len(c))):
        ids.append(row["input_ids"].astype(np.int32))
        targets.append(row["targets"].astype(np.int32))
        offsets.append(offsets[-1] + len(row["input_ids"]))
    lengths = np.diff(offsets)
    rows = pack_rows(np.arange(len(lengths)), lengths, s["seq_len"], 64)
    tok = run.load_tokenizer()
    np.savez(os.path.join(a.work, "data.npz"), ids=np.concatenate(ids), targets=np.concatenate(targets),
             offsets=np.asarray(offsets), row_members=np.concatenate(rows),
             row_offsets=np.cumsum([0] + [len(r) for r in rows]), vocab=len(tok),
             pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return dict(data=a.data, tokenizer=a.tokenizer, examples=len(lengths), mean_tokens=round(float(lengths.mean()), 1),
                max_tokens=int(lengths.max()), rows=len(rows), seq_len=s["seq_len"],
                padding=round(1 - float(lengths.sum()) / (len(rows) * s["seq_len"]), 4), prepare_seconds=round(seconds, 1))


def part_packing(a) -> dict:
    """Rows of 1024 and 1536 tokens, several examples each, vs every example alone, with the attention kernel
    alpaca train would pick here."""
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import jax.random as jrandom
    import numpy as np
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core import attention
    from alpaca_cli.core.batches import build_row
    from alpaca_cli.core.logits import model_logits

    s, d = sizes(a), load_data(a)
    platform = attention.platform_of(jax.devices()[0])
    n_examples = len(d["offsets"]) - 1
    out = {"platform": platform.name, "lengths": {}}
    for seq_len in (1024, 1536):
        choice = attention.choose("auto", None, seq_len, platform)
        lev = llama_config(s, s["packing"], seq_len, False, choice)
        Pos, Vocab = lev.max_Pos, hax.Axis("vocab", vocab_size(s, d))
        model32 = lev.build(Vocab, key=jrandom.PRNGKey(0))
        model16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating)
                                         else x, model32)
        # examples in data order until the row is full (the last one cut to fill it exactly: a long example at the
        # end of the row, where a packing bug would show most)
        members, used, i = [], 0, 0
        while used < seq_len and i < n_examples:
            ids, targets = example(d, i)
            take = min(len(ids), seq_len - used)
            members.append((ids[:take], targets[:take]))
            used += take
            i += 1
        pad = int(d["pad_id"])

        @jax.jit
        def logits(model, tokens, segments, positions):
            t, sg, ps = (hax.named(x, Pos) for x in (tokens, segments, positions))
            mask = AttentionMask.causal().with_segment_ids(sg)
            return model_logits(model, t, mask, pos_ids=ps).array.astype(jnp.float32)

        tokens, _, segments, positions = build_row(members, seq_len, pad, 1.0)
        packed = np.asarray(logits(model16, tokens, segments, positions))
        # the control: the same row as one sequence (examples attending to each other), which the comparison
        # below must tell apart from the packed row, or it proves nothing
        leaky = np.asarray(logits(model16, tokens, np.zeros_like(segments), positions))
        worst, floor, at = 0.0, 0.0, 0
        for ids, targets in members:
            n = len(ids)
            t1, _, s1, p1 = build_row([(ids, targets)], seq_len, pad, 1.0)
            alone16 = np.asarray(logits(model16, t1, s1, p1))[:n]
            alone32 = np.asarray(logits(model32, t1, s1, p1))[:n]
            worst = max(worst, float(np.abs(packed[at : at + n] - alone16).max()))
            floor = max(floor, float(np.abs(alone32 - alone16).max()))
            at += n
        scale = float(np.abs(packed[:at]).max())
        tolerance = max(2 * floor, 1e-3 * scale)
        control = float(np.abs(leaky[:at] - packed[:at]).max())
        out["lengths"][str(seq_len)] = dict(
            backend=choice.backend, block=choice.block, levanter_backend=str(lev.attn_backend),
            examples=len(members), packed_vs_alone_max_abs=worst, bf16_vs_f32_max_abs=floor, logit_scale=scale,
            tolerance=tolerance, unmasked_control_max_abs=control, equal=bool(worst <= tolerance),
            control_detected=bool(control > tolerance),
        )
    out["equal"] = all(v["equal"] for v in out["lengths"].values())
    if not out["equal"]:
        raise AssertionError(f"packed logits differ from unpacked beyond bfloat16 rounding: {out['lengths']}")
    if not all(v["control_detected"] for v in out["lengths"].values()):
        raise AssertionError(f"the check cannot tell packed rows from examples attending to each other: {out}")
    return out


def part_train(a, remat: str) -> dict:
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import jax.random as jrandom
    import numpy as np
    from levanter.trainer import Trainer

    from alpaca_cli.core import attention
    from alpaca_cli.core.batches import PackedRow, build_row, make_loss_fn
    from alpaca_cli.core.train_setup import parameter_count
    from alpaca_cli.train_config import TrainConfig

    s, d = sizes(a), load_data(a)
    device = jax.devices()[0]
    choice = attention.choose("auto", None, s["seq_len"], attention.platform_of(device))
    lev = llama_config(s, s, s["seq_len"], remat == "on", choice)
    vocab = vocab_size(s, d)
    total = s["warmup"] + s["steps"]
    optimizer = TrainConfig().optimizer.build(total)
    pad = int(d["pad_id"])

    def batch(step):
        rows, real, trained = [], 0, 0
        chosen = step_rows(d, s, step)
        step_trained = sum(int(example(d, e)[1][1:].sum()) for r in chosen for e in r)
        for members in chosen:
            exs = [example(d, e) for e in members]
            rows.append(build_row(exs, s["seq_len"], pad, 1.0 / max(1, step_trained)))
            real += sum(len(x[0]) for x in exs)
        trained = step_trained
        B, Pos = hax.Axis("batch", s["rows"]), lev.max_Pos
        arrays = [hax.named(jnp.asarray(np.stack([r[k] for r in rows])), (B, Pos)) for k in range(4)]
        return PackedRow(*arrays), real, trained

    with Trainer(trainer_config(s, a.work, total), optimizer, make_loss_fn(vocab), add_default_hooks=False) as trainer:
        Vocab = hax.Axis("vocab", vocab)
        _, mkey, tkey = jrandom.split(jrandom.PRNGKey(0), 3)
        t0 = time.time()
        state = trainer.initial_state(tkey, model_init=lambda: lev.build(Vocab, key=mkey))
        init_seconds = time.time() - t0
        times, reals, losses = [], [], []
        first = None
        for step in range(total):
            row, real, _ = batch(step)
            t = time.perf_counter()
            info = trainer.train_step(state, row)
            state = info.state
            losses.append(float(info.loss))
            dt = time.perf_counter() - t
            if step == 0:
                first = dt
            if step >= s["warmup"]:
                times.append(dt)
                reals.append(real)
        stats = device.memory_stats() or {}  # read before the compile below, whose autotuning allocates too
        compiled = None
        try:  # the device compiler's own view of the step's memory
            row0 = batch(0)[0]
            compiled = trainer._jit_train_step_fn_no_hook.lower(state, (row0,), {}).compile().memory_analysis()
        except Exception as e:  # noqa: BLE001 - a figure to report, not a reason to stop
            print(f"memory_analysis unavailable: {e}", file=sys.stderr)
    params, _ = parameter_count(lev, vocab)
    tps = sum(reals) / sum(times)
    peak = device_peak_tflops(device)
    peak = peak and peak * jax.device_count()  # tokens/s of every device (a TPU host's chips)
    analysis = None
    if compiled is not None:
        analysis = gib(compiled.argument_size_in_bytes + compiled.output_size_in_bytes
                       - compiled.alias_size_in_bytes + compiled.temp_size_in_bytes)
    if not all(np.isfinite(losses)):
        raise AssertionError(f"non-finite loss: {losses}")
    return dict(remat=remat, attention=choice.backend, block=choice.block, layers=s["num_layers"],
                parameters=params, rows=s["rows"], seq_len=s["seq_len"], steps_timed=len(times),
                first_step_seconds=round(first, 2), step_seconds=round(sum(times) / len(times), 4),
                tokens_per_second=round(tps, 1), mfu=None if peak is None else round(mfu(params, lev, tps, peak), 4),
                peak_memory_gib=gib(stats.get("peak_bytes_in_use")), gpu_compiler_memory_gib=analysis,
                init_seconds=round(init_seconds, 1), losses=[round(x, 4) for x in losses])


def part_plan(a, remat: str) -> dict:
    """compile_step for the train part's shapes on one simulated CPU device (what --dry-run --target does)."""
    from types import SimpleNamespace

    import jax

    from alpaca_cli.core import attention, machines
    from alpaca_cli.core.target_compile import compile_step, verdict
    from alpaca_cli.train_config import TrainConfig

    s, d = sizes(a), load_data(a)
    target = machines.get(a.target) if a.target else machines.cpu_target(1)
    platform = target.platform if a.target else attention.platform_of(jax.devices()[0])
    choice = attention.choose("auto", None, s["seq_len"], platform)
    lev = llama_config(s, s, s["seq_len"], remat == "on", choice)
    total = s["warmup"] + s["steps"]
    cfg = TrainConfig()
    plan = SimpleNamespace(rows_per_step=s["rows"], steps=total)
    step = compile_step(cfg, plan, lev, vocab_size(s, d), target, trainer_config(s, a.work, total))
    v, text = verdict(step, target)
    return dict(remat=remat, target=target.name, compiler=step.compiler,
                predicted_gib=round(step.accelerator_total_gib, 3),
                arguments_gib=round(step.arguments_gib, 3), temporaries_gib=round(step.temporaries_gib, 3),
                verdict=v, verdict_text=text, compile_seconds=round(step.compile_seconds, 1))


def part_torch(a, remat: str) -> dict:
    import numpy as np
    import torch
    import transformers

    from alpaca_cli.core import attention
    from alpaca_cli.core.train_setup import parameter_count

    s, d = sizes(a), load_data(a)
    dev = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    platform = attention.Platform("cpu" if dev.type == "cpu" else "gpu")
    lev = llama_config(s, s, s["seq_len"], remat == "on", attention.choose("auto", None, s["seq_len"], platform))
    vocab = vocab_size(s, d)
    hf_config = lev.to_hf_config(vocab)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with dev:  # initialised where it runs (2 billion parameters initialised on the CPU took longer than the steps)
        model = transformers.LlamaForCausalLM(hf_config)
    if remat == "on":
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=dev.type == "cuda")
    pad = int(d["pad_id"])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def microbatches(step):
        exs = [example(d, e) for r in step_rows(d, s, step) for e in r]
        for i in range(0, len(exs), s["micro"]):
            part = exs[i : i + s["micro"]]
            n = max(len(x[0]) for x in part)
            ids = np.full((len(part), n), pad, np.int64)
            labels = np.full((len(part), n), -100, np.int64)
            mask = np.zeros((len(part), n), np.int64)
            for j, (x, t) in enumerate(part):
                ids[j, : len(x)], mask[j, : len(x)] = x, 1
                labels[j, : len(x)] = np.where(t > 0, x, -100)
            yield (torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev), torch.from_numpy(labels).to(dev),
                   sum(len(x[0]) for x in part))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    total = s["warmup"] + s["steps"]
    times, reals, losses = [], [], []
    for step in range(total):
        mbs = list(microbatches(step))
        sync()
        t = time.perf_counter()
        real, loss_sum = 0, 0.0
        for ids, mask, labels, n in mbs:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(mbs)
            loss.backward()
            loss_sum += float(loss.detach())
            real += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t
        losses.append(loss_sum)
        if step >= s["warmup"]:
            times.append(dt)
            reals.append(real)
    params, _ = parameter_count(lev, vocab)
    tps = sum(reals) / sum(times)
    peak = None
    if dev.type == "cuda":
        peak = device_peak_tflops(type("D", (), {"device_kind": torch.cuda.get_device_name(0)})())
    if not all(np.isfinite(losses)):
        raise AssertionError(f"non-finite loss: {losses}")
    return dict(remat=remat, device=str(dev), torch=torch.__version__, transformers=transformers.__version__,
                microbatch=s["micro"], steps_timed=len(times), step_seconds=round(sum(times) / len(times), 4),
                tokens_per_second=round(tps, 1), mfu=None if peak is None else round(mfu(params, lev, tps, peak), 4),
                peak_memory_gib=gib(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
                losses=[round(x, 4) for x in losses])


# -- the driver ------------------------------------------------------------------------------------------------------


def run_part(a, name: str, arg: str | None, limit: float) -> dict:
    """Run one part in a fresh process; its result (or error) as a dict."""
    key = name if arg is None else f"{name}_remat_{arg}"
    result_file = os.path.join(a.work, f"{key}.json")
    cmd = [sys.executable, os.path.abspath(__file__), a.out, "--part", name, "--work", a.work,
           "--data", a.data, "--tokenizer", a.tokenizer]
    cmd += ["--cpu"] if a.cpu else []
    cmd += ["--arg", arg] if arg else []
    for flag in ("layers", "rows", "steps", "target"):
        if getattr(a, flag):
            cmd += [f"--{flag}", str(getattr(a, flag))]
    env = dict(os.environ)
    if a.cpu or name in ("plan", "torch", "data"):
        # the plan compiles on one simulated CPU device; the others must not make JAX take the GPU's memory
        env["JAX_PLATFORMS"] = "cpu"
    # one device: the check is about one GPU (and an inherited device count, a test's say, would change the mesh);
    # the plan for a TPU slice (tpu_check.sh) simulates the slice's devices
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if name == "plan" and a.target:
        from alpaca_cli.core import machines

        flags.append(f"--xla_force_host_platform_device_count={machines.get(a.target).devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    t0 = time.time()
    log = os.path.join(a.work, f"{key}.log")
    print(f"== {key} (at most {limit:.0f} s)", flush=True)
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = round(time.time() - t0, 1)
    if rc == 0 and os.path.exists(result_file):
        with open(result_file) as f:
            out = json.load(f)
        out["seconds"] = seconds
        print(f"   ok in {seconds} s: {json.dumps(out)[:300]}", flush=True)
        return out
    with open(log) as f:
        tail = f.read()[-3000:]
    print(f"   FAILED ({rc}) in {seconds} s; the end of {log}:\n{tail}", flush=True)
    return {"error": f"exit {rc}", "seconds": seconds, "log_tail": tail[-1500:]}


def _cell(v) -> str:
    return "-" if v is None else str(v)  # not measured here (MFU and peak memory on CPU, say)


def markdown(results: dict) -> str:
    env = {k: _cell(v) for k, v in results.get("env", {}).items()}
    lines = [f"# GPU check ({'CPU mode' if results['cpu_mode'] else env.get('device_kind', '?')})", "",
             f"Python {env.get('python')}, jax {env.get('jax')} ({env.get('platform')}), levanter "
             f"{env.get('levanter')}, haliax {env.get('haliax')}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}; compat restored jax.core.is_constant_dim: "
             f"{env.get('compat_restored_is_constant_dim')}", ""]
    data = results.get("data", {})
    if "examples" in data:
        lines += [f"Data: {data['examples']} examples ({data['mean_tokens']} tokens on average), {data['rows']} rows "
                  f"of {data['seq_len']}, padding {data['padding']:.1%}.", ""]
    pk = results.get("packing", {})
    lines += ["## Attention and packing", "", "| row | backend | block | examples | packed vs alone | bf16 vs f32 "
              "| equal |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, v in pk.get("lengths", {}).items():
        lines.append(f"| {n} | {v['backend']} | {v['block']} | {v['examples']} | {v['packed_vs_alone_max_abs']:.3g} "
                     f"| {v['bf16_vs_f32_max_abs']:.3g} | {v['equal']} |")
    if "error" in pk:
        lines.append(f"| failed: {pk['error']} | | | | | | |")
    lines += ["", "## Training throughput (tokens of the examples per second)", "",
              "| framework | remat | step s | tokens/s | MFU | peak GiB | predicted GiB (plan) | GPU compiler GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for remat in ("off", "on"):
        t, p = results.get(f"train_remat_{remat}", {}), results.get(f"plan_remat_{remat}", {})
        cells = [t.get("step_seconds", t.get("error")), t.get("tokens_per_second"), t.get("mfu"),
                 t.get("peak_memory_gib"), p.get("predicted_gib", p.get("error")), t.get("gpu_compiler_memory_gib")]
        lines.append(f"| alpaca (Levanter, packed) | {remat} | " + " | ".join(map(_cell, cells)) + " |")
    for remat in ("off", "on"):
        t = results.get(f"torch_remat_{remat}", {})
        cells = [t.get("step_seconds", t.get("error")), t.get("tokens_per_second"), t.get("mfu"),
                 t.get("peak_memory_gib")]
        lines.append(f"| transformers + torch (padded, microbatch {_cell(t.get('microbatch'))}) | {remat} | "
                     + " | ".join(map(_cell, cells)) + " | | |")
    ratios = []
    for remat in ("off", "on"):
        j, h = results.get(f"train_remat_{remat}", {}), results.get(f"torch_remat_{remat}", {})
        if j.get("tokens_per_second") and h.get("tokens_per_second"):
            ratios.append(f"remat {remat}: alpaca / transformers = {j['tokens_per_second'] / h['tokens_per_second']:.2f}x")
    lines += ["", "; ".join(ratios) or "(no ratio: a side did not run or failed)", ""]
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    lines.append(f"Failed parts: {', '.join(failed)}" if failed else "All parts passed.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--cpu", action="store_true", help="a tiny model on CPU: the script proven end to end")
    p.add_argument("--data", help="Alpaca records (.json/.jsonl); default: .gpu/data/alpaca_en_demo.json if carried, "
                   "else the package's demo records")
    p.add_argument("--tokenizer", help="default: .gpu/data/llama-sp-32k if carried, else the package's demo tokenizer")
    p.add_argument("--layers", type=int, help="layers of the timed model (default 8 on GPU, 2 on CPU)")
    p.add_argument("--rows", type=int, help="rows per step (default 32 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps after the warm-up (default 8 on GPU, 2 on CPU)")
    p.add_argument("--target", help="the compiled plan's target (default: 1xh200 on GPU, this CPU with --cpu)")
    p.add_argument("--only", help="comma-separated parts to run (env,data,packing,train,plan,torch)")
    p.add_argument("--budget", type=float, help="seconds for all parts; parts that would start later are skipped "
                   "(default 450 on GPU, none with --cpu)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--arg", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.data is None:
        carried = os.path.join(CARRIED, "alpaca_en_demo.json")
        a.data = carried if os.path.exists(carried) and not a.cpu else os.path.join(REPO, "alpaca_cli", "assets",
                                                                                      "demo_data.jsonl")
    if a.tokenizer is None:
        carried = os.path.join(CARRIED, "llama-sp-32k")
        a.tokenizer = carried if os.path.exists(carried) and not a.cpu else os.path.join(REPO, "alpaca_cli", "assets",
                                                                                          "demo_tokenizer")
    if a.target is None and not a.cpu:
        a.target = "1xh200"
    if a.budget is None and not a.cpu:
        a.budget = 450.0

    if a.part:  # one part, in this process
        fn = {"env": part_env, "data": part_data, "packing": part_packing, "train": part_train, "plan": part_plan,
              "torch": part_torch}[a.part]
        out = fn(a, a.arg) if a.arg else fn(a)
        key = a.part if a.arg is None else f"{a.part}_remat_{a.arg}"
        with open(os.path.join(a.work, f"{key}.json"), "w") as f:
            json.dump(out, f)
        return 0

    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    deadline = t0 + a.budget if a.budget else None
    only = set(a.only.split(",")) | {"data"} if a.only else None
    todo = [(n, arg, cpu if a.cpu else gpu) for n, arg, gpu, cpu in PARTS if only is None or n in only]
    results: dict = {"cpu_mode": a.cpu}

    def one(name, arg, limit):
        key = name if arg is None else f"{name}_remat_{arg}"
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 20:
            return key, {"error": "skipped: out of time (--budget)"}
        try:
            return key, run_part(a, name, arg, limit if left is None else min(limit, left))
        except Exception as e:  # noqa: BLE001 - the driver records and goes on
            return key, {"error": f"{type(e).__name__}: {e}", "log_tail": traceback.format_exc()[-1500:]}

    with tempfile.TemporaryDirectory(prefix="alpaca-gpu-check-") as work:
        a.work = work
        for part in [p for p in todo if p[0] in ("env", "data")]:
            key, results[key] = one(*part)
        if "error" not in results.get("data", {}):
            # the plan compiles on the CPU: beside the device's parts, in threads that each wait on a process
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=1) as pool:
                planned = [pool.submit(one, *p) for p in todo if p[0] == "plan"]
                for part in [p for p in todo if p[0] not in ("env", "data", "plan")]:
                    key, results[key] = one(*part)
                for f in planned:
                    key, results[key] = f.result()
        results["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(a.out, "gpu_check.log"), "w") as log:
            for name in sorted(os.listdir(work)):
                if name.endswith(".log"):
                    with open(os.path.join(work, name)) as f:
                        log.write(f"===== {name}\n{f.read()[-20000:]}\n")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"(all parts: {results['seconds']} s; {a.out}/gpu_check.json, {a.out}/gpu_check.md)")
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
