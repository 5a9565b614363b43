"""`alpaca prepare`: read Alpaca-style records (prompts and Stanford's labels) or conversations (the chat template
and assistant-only labels), write a token cache."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.config import PREPARE_FLAGS, Settings
from alpaca_cli.options import CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, QuietOpt, RunDirOpt, config_options

EXAMPLES = """\b
Examples:
  alpaca prepare --run-dir runs/llama2-alpaca
  alpaca prepare --data my_data.jsonl --tokenizer ./llama-tokenizer --run-dir runs/mine
  alpaca prepare --data gs://bucket/alpaca.json --run-dir gs://bucket/runs/alpaca --max-length 1024
  alpaca prepare --data demo --tokenizer demo --run-dir runs/demo      (the built-in demo, offline)
  alpaca prepare --data chat.jsonl --format messages --tokenizer ./instruct-tokenizer --run-dir runs/chat
  alpaca prepare --data sharegpt.json --chat-template chatml --train-on last --run-dir runs/chat
  alpaca prepare --data tatsu-lab/alpaca,weight=3 --data chat.jsonl,format=messages,chat_template=chatml,weight=1
                 --run-dir runs/mix   (a mixture: one cache, sampled 3:1 by train)
"""


@config_options(PREPARE_FLAGS)
def prepare(
    run_dir: RunDirOpt = None,
    settings: Settings = None,  # the flags of PREPARE_FLAGS, --config and --set (config_options)
    prompts: Annotated[
        Optional[str],
        typer.Option(
            help="JSON or YAML file with prompt_input and prompt_no_input templates. Default: Stanford's templates. "
            "Config key: prompts.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a cache prepared from different inputs.")
    ] = False,
    quiet: QuietOpt = False,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
) -> None:
    """Tokenize Alpaca records (Stanford's loss mask) or conversations (assistant turns) into a Levanter cache."""
    from alpaca_cli import config as cfgmod
    from alpaca_cli import console, rundir
    from alpaca_cli.config import PrepareConfig
    from alpaca_cli.core import prepare as core
    from alpaca_cli.core.demo_assets import resolve_builtin_data, resolve_builtin_tokenizer
    from alpaca_cli.core.prompts import load_prompts_file

    prompt_templates = cfgmod.encode(load_prompts_file(prompts)) if prompts else None
    cfg = settings.resolve(PrepareConfig, extra={"prompts": prompt_templates}, adapt=cfgmod.data_list_to_sources)
    sources = [cfgmod.replace(s, name=s.label, data=resolve_builtin_data(s.data)) for s in cfg.sources]
    cfg = cfgmod.replace(cfg, data=resolve_builtin_data(cfg.data), tokenizer=resolve_builtin_tokenizer(cfg.tokenizer),
                         sources=sources)
    from alpaca_cli import distributed
    from alpaca_cli.core.prepare_sources import prepare_sources

    prepare_any = prepare_sources if cfg.sources else core.prepare  # a mixture, or today's one source

    distributed.initialize(coordinator_address, num_processes, process_id)
    run = rundir.open_run(run_dir, create=True, writer=distributed.is_writer())
    # one process prepares the shared cache; the others wait for it and get its outcome (or its error)
    with run.lease("prepare"):
        result = distributed.on_writer(
            lambda: prepare_any(cfg, run, overwrite=overwrite, progress=console.BarProgress(quiet)),
            encode=lambda r: {"reused": r.reused, "stats": r.stats, "fingerprint": r.fingerprint},
            decode=lambda d: core.PrepareResult(**d),
        )
    if distributed.is_writer():
        print_stats(result.stats, reused=result.reused, run_url=run.url)


def print_stats(stats: dict, *, reused: bool, run_url: str) -> None:
    from rich.table import Table

    from alpaca_cli import console

    t = Table(title=f"prepared {run_url}" + (" (reused: same inputs)" if reused else ""), show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    dropped = stats["dropped"]
    conversational = stats.get("format", "alpaca") not in ("alpaca", "mixture")
    t.add_row("conversations read" if conversational else "records read", f"{stats['records_read']:,}")
    if conversational:
        conversation_rows(t, stats)
    t.add_row("examples kept", f"{stats['examples']:,}")
    t.add_row("truncated", f"{stats['truncated']:,} ({stats['truncated_tokens']:,} tokens cut)")
    if conversational:
        t.add_row("cut inside an assistant turn", f"{stats['cut_in_turn']:,}")
        t.add_row("assistant turns beyond --max-length", f"{stats['turns_beyond_limit']:,}")
    t.add_row("dropped: too long", f"{dropped.get('too_long', 0):,}")
    t.add_row("dropped: no trained token", f"{dropped.get('no_trained_tokens', 0):,}")
    t.add_row("tokens", f"{stats['tokens']:,}")
    t.add_row("trained tokens", f"{stats['trained_tokens']:,} ({100 * stats['trained_fraction']:.1f}%)")
    L = stats["length"]
    t.add_row("length mean / p50 / p90 / p99 / max", f"{L['mean']:.1f} / {L['p50']:.0f} / {L['p90']:.0f} / {L['p99']:.0f} / {L['max']}")
    t.add_row(
        "2048-token rows: packed vs padded",
        f"{stats['rows_2048_packed']:,} vs {stats['rows_2048_padded']:,} "
        f"({stats['rows_2048_padded'] / max(1, stats['rows_2048_packed']):.1f}x fewer)",
    )
    t.add_row("vocabulary", f"{stats['vocab_size']:,}" + (f" (added {', '.join(stats['added_tokens'].values())})" if stats["added_tokens"] else ""))
    if stats.get("records_with_special_token_text"):
        t.add_row("records whose text contains special-token strings", f"{stats['records_with_special_token_text']:,}")
    console.stdout.print(t)
    if stats.get("sources"):
        console.stdout.print(sources_table(stats["sources"]))


def sources_table(sources: list[dict]):
    """A mixture's sources: what each held and kept, and the share of the training examples and trained tokens its
    weight (or epochs) asks for."""
    from rich.table import Table

    t = Table(title="sources (shares: what the weights ask for, before held-out data)")
    for col in ("source", "format", "records", "kept", "trained tokens", "weight", "share of examples",
                "share of trained tokens"):
        t.add_column(col, justify="left" if col in ("source", "format") else "right")
    for s in sources:
        weight = f"{s['weight']:g}" if s.get("weight") is not None else (
            f"{s['epochs']:g} epochs" if s.get("epochs") is not None else "-")
        t.add_row(s["name"], s["format"], f"{s['records_read']:,}", f"{s['examples']:,}",
                  f"{s['trained_tokens']:,}", weight, f"{100 * s['share_examples']:.1f}%",
                  f"{100 * s['share_trained']:.1f}%")
    return t


def conversation_rows(t, stats: dict) -> None:
    """The prepare table's rows about conversations: format, template, turns by role, turns trained."""
    t.add_row("format / chat template", f"{stats['format']} / {stats['chat_template']}")
    by_role = " / ".join(f"{stats['roles'].get(r, 0):,}" for r in ("system", "user", "assistant", "tool"))
    t.add_row("turns (system / user / assistant / tool)", f"{stats['turns']:,} ({by_role})")
    t.add_row(f"assistant turns trained (--train-on {stats['train_on']})",
              f"{stats['trained_turns']:,} of {stats['assistant_turns']:,}")
    t.add_row("conversations trained turn by turn (the template rewrites earlier turns)",
              f"{stats['split_conversations']:,}")
