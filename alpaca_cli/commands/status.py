"""`alpaca status`: the run's manifest as a table."""

from __future__ import annotations

from typing import Annotated

import typer

from alpaca_cli.options import RunDirOpt

EXAMPLES = """\b
Examples:
  alpaca status --run-dir runs/x
  alpaca status --run-dir gs://bucket/runs/x --json
"""


def status(
    run_dir: RunDirOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the manifest itself.")] = False,
) -> None:
    """Show the run's stages, their state and key figures."""
    from rich.table import Table

    from alpaca_cli import console, rundir

    run = rundir.open_run(run_dir)
    if json_:
        typer.echo(run.manifest.to_json(), nl=False)
        return
    t = Table(title=f"run {run.url}")
    for col in ("stage", "state", "started", "finished", "key figures"):
        t.add_column(col)
    for name in rundir.STAGES:
        st = run.record(name)
        if st is None:
            t.add_row(name, "-", "", "", "")
            continue
        state = rundir.liveness(st)
        style = {"complete": "green", "running": "yellow"}.get(state, "red")
        shown = state if not st.error or state == "complete" else f"{state}: {st.error[:80]}"
        t.add_row(name, f"[{style}]{shown}[/{style}]", st.started or "", st.finished or "", key_figures(run, name))
    console.stdout.print(t)
    if run.train is not None and len(run.train.segments) > 1:
        console.stdout.print(segments_table(run.train.segments))
    holder = run.holder()
    if holder is not None:
        why = holder.dead()
        console.stdout.print(f"in use by {holder.describe()}" + (f"; dead ({why}): the next command takes over"
                                                                  if why else ""), markup=False, highlight=False)


def segments_table(segments):
    """The machines training ran on, one row per start or resume."""
    from rich.table import Table

    from alpaca_cli.core.resume import describe

    t = Table(title="training segments (each start or resume)")
    for col in ("steps", "machine", "platform", "started"):
        t.add_column(col)
    for seg in segments:
        t.add_row(f"{seg.start_step + 1}-{seg.end_step}" if seg.end_step > seg.start_step else f"after {seg.start_step}",
                  describe(seg), seg.platform, seg.started)
    return t


def key_figures(run, name: str) -> str:
    if name == "prepare" and run.prepare is not None and run.prepare.summary is not None:
        s = run.prepare.summary
        frac = s.trained_tokens / max(1, s.tokens)
        text = (
            f"{s.examples:,} examples of {s.records_read:,} records, {s.tokens:,} tokens "
            f"({100 * frac:.0f}% trained), {s.truncated:,} truncated, {sum(s.dropped.values()):,} dropped"
        )
        sources = run.prepare.sources
        if sources:
            text += f" from {len(sources)} sources (" + " · ".join(f"{x.name} {x.examples:,}" for x in sources) + ")"
        return text
    if name == "train" and run.train is not None:
        t, parts = run.train, []
        if t.progress is not None:
            parts.append(f"step {t.progress.step}/{t.progress.total_steps}")
            if t.progress.loss is not None:
                parts.append(f"loss {t.progress.loss:.4f}")
            if t.progress.last_checkpoint and not t.final_checkpoint:
                parts.append(f"checkpoint {t.progress.last_checkpoint}")
        if t.final_checkpoint:
            parts.append(f"final {t.final_checkpoint}")
        return ", ".join(parts)
    if name == "export" and run.export is not None and run.export.outputs is not None:
        o = run.export.outputs
        return " ".join(x for x in (o.export_dir, o.repo_url or "") if x)
    return ""
