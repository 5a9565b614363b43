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
    import json

    from rich.table import Table

    from alpaca_cli import console, rundir

    run = rundir.open_run(run_dir)
    if json_:
        typer.echo(json.dumps(run.manifest, indent=2))
        return
    t = Table(title=f"run {run.url}")
    for col in ("stage", "state", "started", "finished", "key figures"):
        t.add_column(col)
    for name in rundir.STAGES:
        st = run.stage(name)
        if st is None:
            t.add_row(name, "-", "", "", "")
            continue
        style = {"complete": "green", "running": "yellow", "failed": "red"}.get(st.get("status", ""), "")
        t.add_row(
            name,
            f"[{style}]{st.get('status')}[/{style}]" if style else str(st.get("status")),
            str(st.get("started") or ""),
            str(st.get("finished") or ""),
            key_figures(name, st),
        )
    console.stdout.print(t)


def key_figures(name: str, st: dict) -> str:
    s = st.get("summary", {}) or {}
    p = st.get("progress", {}) or {}
    if name == "prepare" and s:
        frac = s["trained_tokens"] / max(1, s["tokens"])
        return (
            f"{s['examples']:,} examples of {s['records_read']:,} records, {s['tokens']:,} tokens "
            f"({100 * frac:.0f}% trained), {s['truncated']:,} truncated, {sum(s['dropped'].values()):,} dropped"
        )
    if name == "train":
        parts = []
        if p:
            parts.append(f"step {p.get('step')}/{p.get('total_steps')}")
            if p.get("loss") is not None:
                parts.append(f"loss {p['loss']:.4f}")
        last = (st.get("outputs") or {}).get("last_checkpoint") or p.get("last_checkpoint")
        if last:
            parts.append(f"checkpoint {last}")
        final = (st.get("outputs") or {}).get("final_checkpoint")
        if final:
            parts.append(f"final {final}")
        return ", ".join(parts)
    if name == "export":
        o = st.get("outputs", {}) or {}
        parts = [str(o.get("path", ""))]
        if o.get("repo_url"):
            parts.append(str(o["repo_url"]))
        return " ".join(x for x in parts if x)
    return ""
