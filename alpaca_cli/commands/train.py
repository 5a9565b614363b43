"""`alpaca train`: fine-tune the base model on the prepared run (sharded, packed, resumable)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.options import ConfigOpt, CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, QuietOpt, RunDirOpt, SetOpt

EXAMPLES = """\b
Examples:
  alpaca train --run-dir runs/llama2-alpaca --model meta-llama/Llama-2-7b-hf
  alpaca train --run-dir gs://bucket/runs/alpaca --config alpaca-llama2.yaml --tensor-parallel 4
  alpaca train --run-dir runs/x --dry-run --json          print the plan (mesh, steps, memory) and exit
  alpaca train --run-dir runs/demo --model demo --learning-rate 3e-3 --epochs 60 --batch-size 16 --seq-len 256
Run the same command again after a crash or preemption: it resumes from the last complete checkpoint.
"""


def train(
    run_dir: RunDirOpt = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Base model: Hub id, local Hugging Face folder, gs:// folder, or `demo`. "
            "Default: meta-llama/Llama-2-7b-hf. Config key: model_name_or_path.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        Optional[float], typer.Option(help="Passes over the data. Default: 3. Config key: epochs.", show_default=False)
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(help="Optimizer steps; overrides --epochs. Config key: trainer.num_train_steps.", show_default=False),
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            help="Examples per optimizer step (packed rows are derived from it). Default: 128. "
            "Config key: trainer.train_batch_size.",
            show_default=False,
        ),
    ] = None,
    learning_rate: Annotated[
        Optional[float], typer.Option(help="Peak learning rate. Default: 2e-5. Config key: optimizer.learning_rate.", show_default=False)
    ] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option(help="AdamW weight decay. Default: 0. Config key: optimizer.weight_decay.", show_default=False)
    ] = None,
    warmup: Annotated[
        Optional[float],
        typer.Option(help="Warmup as a fraction of the steps. Default: 0.03. Config key: optimizer.warmup.", show_default=False),
    ] = None,
    lr_schedule: Annotated[
        Optional[str],
        typer.Option(help="cosine (default), linear or constant. Config key: optimizer.lr_schedule.", show_default=False),
    ] = None,
    precision: Annotated[
        Optional[str],
        typer.Option(
            help="Mixed precision policy, e.g. p=f32,c=bfloat16 (default) or p=f32,c=f32. Config key: trainer.mp.",
            show_default=False,
        ),
    ] = None,
    seq_len: Annotated[
        Optional[int], typer.Option(help="Row length in tokens. Default: 2048. Config key: seq_len.", show_default=False)
    ] = None,
    pack: Annotated[
        Optional[bool],
        typer.Option("--pack/--no-pack", help="Pack examples into rows (default) or pad one per row. Config key: pack.", show_default=False),
    ] = None,
    tensor_parallel: Annotated[
        Optional[int],
        typer.Option(help="Devices per tensor-parallel group. Default: 1. Config key: tensor_parallel.", show_default=False),
    ] = None,
    per_device_rows: Annotated[
        Optional[int],
        typer.Option(
            help="Rows per device per forward pass; fewer than the step's share means gradient accumulation. "
            "Config key: trainer.per_device_parallelism.",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        Optional[int], typer.Option(help="Keep a checkpoint every N steps. Default: 500. Config key: checkpoint_every.", show_default=False)
    ] = None,
    checkpoint_minutes: Annotated[
        Optional[float],
        typer.Option(help="Also checkpoint at least this often. Default: 10. Config key: checkpoint_minutes.", show_default=False),
    ] = None,
    val_fraction: Annotated[
        Optional[float], typer.Option(help="Hold out this fraction for a validation loss. Config key: val_fraction.", show_default=False)
    ] = None,
    val_data: Annotated[
        Optional[str], typer.Option(help="Held-out records file for the validation loss. Config key: val_data.", show_default=False)
    ] = None,
    eval_every: Annotated[
        Optional[int], typer.Option(help="Steps between validation losses. Default: 100. Config key: eval_every.", show_default=False)
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling. Default: 0. Config key: trainer.seed.", show_default=False)] = None,
    wandb_project: Annotated[
        Optional[str],
        typer.Option(help="Log to Weights & Biases (WANDB_MODE=offline honoured). Config key: wandb_project.", show_default=False),
    ] = None,
    tensorboard_dir: Annotated[
        Optional[str], typer.Option(help="Also write TensorBoard logs here. Config key: tensorboard_dir.", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit (no weights are loaded).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as one JSON object.")] = False,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the base model on the prepared data (packed, sharded, resumable)."""
    import json

    from alpaca_cli import config as cfgmod
    from alpaca_cli import console, rundir
    from alpaca_cli._train_config import adapt_tutorial_yaml
    from alpaca_cli.core import distributed

    flags = {
        "model_name_or_path": model,
        "epochs": epochs,
        "trainer.num_train_steps": steps,
        "trainer.train_batch_size": batch_size,
        "optimizer.learning_rate": learning_rate,
        "optimizer.weight_decay": weight_decay,
        "optimizer.warmup": warmup,
        "optimizer.lr_schedule": lr_schedule,
        "trainer.mp": precision,
        "seq_len": seq_len,
        "pack": pack,
        "tensor_parallel": tensor_parallel,
        "trainer.per_device_parallelism": per_device_rows,
        "checkpoint_every": checkpoint_every,
        "checkpoint_minutes": checkpoint_minutes,
        "val_fraction": val_fraction,
        "val_data": val_data,
        "eval_every": eval_every,
        "trainer.seed": seed,
        "wandb_project": wandb_project,
        "tensorboard_dir": tensorboard_dir,
    }
    cfg = cfgmod.load_config(cfgmod.TrainConfig, config, set_, flags, file_adapter=adapt_tutorial_yaml)
    distributed.initialize(coordinator_address, num_processes, process_id)
    from alpaca_cli.core import train as core

    run = rundir.open_run(run_dir, writer=distributed.is_writer())
    progress = None if quiet else console.step_progress_factory()
    def show_plan(plan: dict) -> None:
        if distributed.is_writer() and not quiet:
            console.stderr.print(plan_table(plan))

    result = core.train(cfg, run, dry_run=dry_run, progress_factory=progress, on_plan=show_plan)
    if not distributed.is_writer():
        return
    if result.status == "planned":
        if json_:
            typer.echo(json.dumps(result.plan))
        else:
            console.stdout.print(plan_table(result.plan))
        return
    if result.status == "already_trained":
        typer.echo(f"already trained: {result.final_checkpoint} (run `alpaca export --run-dir {run.url}`)")
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    typer.echo(f"trained {result.plan['steps']} steps, final loss {loss}: {result.final_checkpoint}")


def plan_table(plan: dict):
    from rich.table import Table

    t = Table(title="training plan", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    mesh = plan["mesh"]
    mem = plan["memory_per_device_gib"]
    rows = [
        ("model", f"{plan['model']} ({plan['model_type']}, {plan['parameters']:,} parameters)"),
        ("devices", f"{plan['devices']} {plan['platform']} on {plan['hosts']} host(s): "
                    f"{mesh['data_parallel_fsdp']} data-parallel/FSDP x {mesh['tensor_parallel']} tensor-parallel"),
        ("precision", plan["precision"]),
        ("rows per step", f"{plan['rows_per_step']} x {plan['seq_len']} tokens "
                          f"({'packed' if plan['pack'] else 'one example per row'})"),
        ("examples per step", f"{plan['examples_per_step']:.1f} (asked {plan['batch_size_examples']})"),
        ("steps", f"{plan['steps']:,} ({plan['epochs']} epochs of {plan['train_examples']:,} examples)"),
        ("held-out examples", f"{plan['val_examples']:,}"),
        ("trained tokens", f"{plan['trained_tokens']:,}"),
        ("padding", f"{100 * plan['padding_fraction']:.1f}% of row tokens"),
        ("optimizer", ", ".join(f"{k} {v}" for k, v in plan["optimizer"].items())),
        ("memory per device", f"~{mem['model_and_optimizer']:.2f} GiB model+optimizer, "
                              f"~{mem['activations_estimate']:.2f} GiB activations (estimate)"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t
