"""`alpaca train`: fine-tune the base model on the prepared run (sharded, packed, resumable)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.config import TRAIN_FLAGS, Settings
from alpaca_cli.options import CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, QuietOpt, RunDirOpt, config_options

EXAMPLES = """\b
Examples:
  alpaca train --run-dir runs/llama2-alpaca --model meta-llama/Llama-2-7b-hf
  alpaca train --run-dir gs://bucket/runs/alpaca --config alpaca-llama2.yaml --tensor-parallel 4
  alpaca train --run-dir runs/x --dry-run --json          print the plan (mesh, steps, memory) and exit
  alpaca train --run-dir runs/demo --model demo --learning-rate 3e-3 --epochs 60 --batch-size 16 --seq-len 256
Run the same command again after a crash or preemption: it resumes from the last complete checkpoint.
"""


@config_options(TRAIN_FLAGS)
def train(
    run_dir: RunDirOpt = None,
    settings: Settings = None,  # the flags of TRAIN_FLAGS, --config and --set (config_options)
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit (no weights are loaded).")] = False,
    target: Annotated[
        Optional[str],
        typer.Option(help="With --dry-run: plan for this machine (e.g. 8xa100-80g, v3-32, 1xh200, tpu:v5p:2x2x2; see "
                     "docs/planning.md): the training step is compiled for its devices (simulated on CPU; a TPU "
                     "slice by XLA:TPU itself, deviceless, when libtpu is installed: pip install 'alpaca[plan]'), "
                     "and its memory per device, FLOPs and time per epoch are reported. Only the base model's "
                     "config.json is read.",
                     show_default=False),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as one JSON object.")] = False,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the base model on the prepared data (packed, sharded, resumable)."""
    import contextlib
    import json
    import os

    from alpaca_cli import config as cfgmod
    from alpaca_cli import console, distributed, rundir
    from alpaca_cli.train_config import TrainConfig, adapt_tutorial_yaml, derived_defaults

    if target is not None:
        from alpaca_cli.core import machines
        from alpaca_cli.core.target_compile import simulate_devices
        from alpaca_cli.errors import ConfigError

        if not dry_run:
            raise ConfigError("--target plans a run for another machine: use it with --dry-run")
        simulate_devices(machines.get(target).devices)  # before anything starts JAX
    cfg = settings.resolve(TrainConfig, file_adapter=adapt_tutorial_yaml, derived_defaults=derived_defaults)
    distributed.initialize(coordinator_address, num_processes, process_id)
    from alpaca_cli.core import train as core

    run = rundir.open_run(run_dir, writer=distributed.is_writer())
    progress = None if quiet else console.step_progress_factory()

    def show_plan(plan) -> None:
        if distributed.is_writer() and not quiet:
            console.stderr.print(plan_table(plan))

    with contextlib.nullcontext() if dry_run else run.lease("train"):  # --dry-run writes nothing
        if cfg.wandb_project:
            os.environ.setdefault("WANDB_DIR", run.local_logs_dir())  # W&B writes ./wandb otherwise
        result = core.train(cfg, run, dry_run=dry_run, target=target, progress_factory=progress, on_plan=show_plan)
    if not distributed.is_writer():
        return
    if result.status == "planned":
        if json_:
            typer.echo(json.dumps(cfgmod.encode(result.plan)))
        else:
            console.stdout.print(plan_table(result.plan))
        return
    if result.status == "already_trained":
        typer.echo(f"already trained: {result.final_checkpoint} (run `alpaca export --run-dir {run.url}`)")
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    typer.echo(f"trained {result.plan.steps} steps, final loss {loss}: {result.final_checkpoint}")


def _empty_rows(plan) -> str:
    extra = plan.rows_per_batch - plan.rows_per_step
    if extra <= 0:
        return ""
    return f", and {extra} empty row{'s' * (extra != 1)} per batch to divide over this mesh"


def plan_table(plan):
    from rich.table import Table

    t = Table(title="training plan", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    mem = plan.memory_per_device_gib
    opt = plan.optimizer
    rows = [
        ("model", f"{plan.model} ({plan.model_type}, {plan.parameters:,} parameters)"),
        ("trained", "every parameter" if not plan.lora_r else
         f"LoRA rank {plan.lora_r}: {plan.trainable_parameters:,} parameters "
         f"({100 * plan.trainable_parameters / max(1, plan.parameters):.2f}%), the base frozen"),
        ("devices", f"{plan.devices} {plan.platform} on {plan.hosts} host(s): "
                    f"{plan.mesh.data_parallel_fsdp} data-parallel/FSDP x {plan.mesh.tensor_parallel} tensor-parallel"),
        ("precision", plan.precision),
        ("attention", f"{plan.attention}" + (f", {plan.attention_block}-token blocks" if plan.attention_block else "")
                      + f"; gradient checkpointing {'on' if plan.remat else 'off'}"),
        ("rows per step", f"{plan.rows_per_step} x {plan.seq_len} tokens "
                          f"({'packed' if plan.pack else 'one example per row'})" + _empty_rows(plan)),
        ("examples per step", f"{plan.examples_per_step:.1f} (asked {plan.batch_size_examples})"),
        ("steps", f"{plan.steps:,} ({plan.epochs} epochs of {plan.train_examples:,} examples)"),
        ("held-out examples", f"{plan.val_examples:,}"),
        ("trained tokens", f"{plan.trained_tokens:,}"),
        ("padding", f"{100 * plan.padding_fraction:.1f}% of row tokens"),
        ("optimizer", f"learning_rate {opt.learning_rate}, weight_decay {opt.weight_decay}, warmup {opt.warmup}, "
                      f"lr_schedule {opt.lr_schedule}"),
        ("memory per device", f"~{mem.model_and_optimizer:.2f} GiB model+optimizer, "
                              f"~{mem.activations_estimate:.2f} GiB activations (estimate)"),
    ]
    if plan.resumes:
        rows.append(("resumes", plan.resumes))
    for src in plan.sources:
        rows.append((f"source {src.name}", f"{src.examples:,} examples ({100 * src.share_examples:.1f}%, "
                     f"{src.epochs} epochs of {src.train_examples:,}), {100 * src.share_trained:.1f}% of the trained "
                     "tokens"))
    c = plan.compiled
    if c is not None:
        m = c.memory_per_device_gib
        step = (f"at least {m.total:.2f} GiB per device on {c.compiler}, which refused to place it (no breakdown)"
                if m.refused else
                f"{m.total:.2f} GiB per device on {c.compiler}: arguments {m.arguments:.2f}, outputs {m.outputs:.2f} "
                f"(reusing {m.aliased:.2f}), temporaries {m.temporaries:.2f}"
                + (f" (of which {m.cpu_upcast:.2f} float32 copies of bfloat16 weights, CPU only)" if m.cpu_upcast
                   else ""))
        rows += [
            ("compiled by", c.compiled_by),
            ("compiled step", f"{step}; compiled in {c.compile_seconds:.0f} s"),
            ("verdict", m.verdict_text),
            ("FLOPs per step", f"{c.model_flops_per_step:.3g} (model), {c.compiled_flops_per_step:.3g} (compiled)"),
            ("time", f"{c.step_seconds_at_40_mfu:.2f} s / step, {c.epoch_hours_at_40_mfu:.2f} h / epoch at 40% MFU; "
                     f"{c.step_seconds_at_60_mfu:.2f} s, {c.epoch_hours_at_60_mfu:.2f} h at 60%"),
        ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t
