"""Write docs/reference.md: every command, every flag, its config key and help, from the CLI itself.

Run after changing a flag: `python scripts/gen_reference.py`. tests/test_docs.py fails when the file is stale.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "reference.md")


def render() -> str:
    import typer

    sys.path.insert(0, ROOT)
    from alpaca_cli.main import COMMANDS, app

    group = typer.main.get_command(app)
    lines = [
        "# Command reference",
        "",
        "Generated from the CLI by `scripts/gen_reference.py`; `alpaca COMMAND --help` shows the same with examples.",
        "Flags override `--set key=value`, which overrides `--config FILE`, which overrides the defaults.",
        "",
    ]
    for name, _, _ in COMMANDS:
        cmd = group.commands[name]
        lines += [f"## alpaca {name}", "", (cmd.help or "").strip().splitlines()[0], ""]
        lines += ["| flag | type | help |", "| --- | --- | --- |"]
        for p in cmd.params:
            if p.name == "help":
                continue
            opts = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]) if p.opts and p.opts[0].startswith("-") else f"`{p.name.upper()}` (argument)"
            annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            kind = "flag" if getattr(p, "is_flag", False) else getattr(annotation, "__name__", str(annotation))
            text = " ".join((getattr(p, "help", None) or "").split()).replace("|", "\\|")
            envvar = getattr(p, "envvar", None)
            if envvar:
                text += f" Env: `{envvar}`."
            lines.append(f"| {opts} | {kind} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(render())
    print(f"wrote {OUT}")
