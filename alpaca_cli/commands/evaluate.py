"""`alpaca eval`: held-out loss, perplexity and EOS-stop rate of the fine-tuned model (and of the base model)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.config import EVAL_FLAGS, EvalConfig, Settings
from alpaca_cli.options import CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, RunDirOpt, config_options

EXAMPLES = """\b
Examples:
  alpaca eval --data held_out.jsonl --run-dir runs/llama2-alpaca --base     the fine-tuned model beside the base model
  alpaca eval --data held_out.jsonl --run-dir runs/x --step 499 --json
  alpaca eval --data held_out.jsonl --from-export runs/x/hf
  alpaca eval --data demo --run-dir runs/demo                               the built-in records (the quickstart's)
  alpaca eval --data held_out.jsonl --run-dir runs/x --set max_new_tokens=512
Scores go to the run's manifest and, when the run has an export, to its model card.
On a pod, run the same command on every host: they score together (the model sharded over all of them); host 0 writes.
"""


@config_options(EVAL_FLAGS)
def eval_(
    data: Annotated[
        str, typer.Option(help="Held-out Alpaca records (.json/.jsonl, local or gs://, or `demo`: the built-in 48), "
                          "read with the run's field names and prepared like its training data; for a run prepared "
                          "from conversations, conversations (messages or ShareGPT), scored on assistant tokens.",
                          show_default=False)
    ],
    run_dir: RunDirOpt = None,
    step: Annotated[Optional[int], typer.Option(help="Score RUN/checkpoints/step-N instead of the final checkpoint.",
                                                show_default=False)] = None,
    from_export: Annotated[
        Optional[str], typer.Option(help="Score an exported Hugging Face folder instead.", show_default=False)
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Also score the base model (as training started from it).")] = False,
    settings: Settings = None,  # the flags of EVAL_FLAGS, --config and --set (config_options)
    json_: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
) -> None:
    """Score a model on held-out records: loss, perplexity and how often it stops on its own."""
    import contextlib
    import json

    from alpaca_cli import config as cfgmod
    from alpaca_cli import distributed, rundir
    from alpaca_cli.errors import ConfigError

    cfg = settings.resolve(EvalConfig)
    if base and from_export is not None and run_dir is None:
        raise ConfigError("--base needs the run (--run-dir): its base model is the one training started from")
    distributed.initialize(coordinator_address, num_processes, process_id)
    writer = distributed.is_writer()  # several processes (a pod's hosts) score together; process 0 writes and prints
    run = rundir.open_run(run_dir, writer=writer) if (from_export is None or run_dir is not None) else None
    # eval records its scores in the manifest (and the export's model card): a writer like export, so it holds the
    # run's lease; a train running meanwhile would overwrite the record with its own copy of the manifest
    with run.lease("eval") if run is not None else contextlib.nullcontext():
        scores = _score(run, data, cfg, step=step, from_export=from_export, base=base)
    if not writer:
        return
    if json_:
        typer.echo(json.dumps([cfgmod.encode(s) for s in scores], indent=2))
        return
    _print_table(scores, data)


def _score(run, data: str, cfg: EvalConfig, *, step, from_export, base) -> list:
    """The scores of the model (and of the base model), every process together; the writer records them."""
    import dataclasses

    from alpaca_cli import distributed
    from alpaca_cli.config import PrepareConfig
    from alpaca_cli.core import evaluate as core
    from alpaca_cli.core.demo_assets import resolve_builtin_data
    from alpaca_cli.core.generate import Request, load_generator

    pcfg = run.require_prepare().config if run is not None else PrepareConfig()
    path = resolve_builtin_data(data)  # `demo`, as prepare reads it
    conversations = core.scores_conversations(run, from_export)
    held_out = distributed.on_writer(
        lambda: core.held_out(pcfg, path, conversations=conversations),
        encode=lambda h: {"requests": [dataclasses.asdict(r) for r in h.requests], "outputs": h.outputs,
                          "conversations": h.conversations},
        decode=lambda h: core.HeldOut([Request(**r) for r in h["requests"]], h["outputs"],
                                      conversations=h["conversations"]))
    label = f"export {from_export}" if from_export else _checkpoint_label(run, step)
    models = [(label, lambda: load_generator(run, from_export=from_export, step=step))]
    if base:
        models.append(("base", lambda: load_generator(run, base=True)))
    # EvalConfig's fields are score()'s settings
    return core.evaluate(run, held_out, pcfg, models, data=data, **dataclasses.asdict(cfg))


def _checkpoint_label(run, step) -> str:
    from alpaca_cli.core.checkpoints import find_checkpoint

    return f"step-{find_checkpoint(run, step).step}"


def _print_table(scores, data: str) -> None:
    from rich.table import Table

    from alpaca_cli import console

    t = Table(title=f"held-out: {data}")
    eos = f"EOS-stop rate (≤{scores[0].max_new_tokens} tokens)"
    for col in ("model", "examples", "trained tokens", "loss", "perplexity", eos):
        t.add_column(col, justify="left" if col == "model" else "right")
    for s in scores:
        t.add_row(s.model, f"{s.examples:,}", f"{s.trained_tokens:,}", f"{s.loss:.4f}", f"{s.perplexity:,.2f}",
                  f"{100 * s.eos_stop_rate:.1f}% ({s.eos_stopped}/{s.prompts})")
    console.stdout.print(t)
