"""Option aliases shared by the commands (one help text per concept)."""

from typing import Annotated, Optional

import typer

RunDirOpt = Annotated[
    Optional[str],
    typer.Option(
        "--run-dir",
        help="Run directory, a local path or gs://bucket/path. Default: $ALPACA_RUN_DIR, else ./alpaca-run.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", "-c", help="YAML config file (local or remote). Flags override it.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override one config key, e.g. --set optimizer.beta2=0.95 (repeatable). Beats --config, loses to flags.",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
CoordinatorOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Multi-host without TPU/SLURM detection: coordinator host:port (process 0's).",
        show_default=False,
        envvar="ALPACA_COORDINATOR_ADDRESS",
        rich_help_panel="Multi-host",
    ),
]
NumProcessesOpt = Annotated[
    Optional[int],
    typer.Option(help="Multi-host: number of processes.", show_default=False, envvar="ALPACA_NUM_PROCESSES",
                 rich_help_panel="Multi-host"),
]
ProcessIdOpt = Annotated[
    Optional[int],
    typer.Option(help="Multi-host: this process's index (0 writes the shared files).", show_default=False,
                 envvar="ALPACA_PROCESS_ID", rich_help_panel="Multi-host"),
]


def describe(text: str, cls: type, key: str, *, default: bool = True) -> str:
    """A flag's help: what it does, its default (read from the config dataclass, never written twice), its key."""
    from alpaca_cli.config import default_text

    parts = [text, default_text(cls, key) if default else "", f"Config key: {key}."]
    return " ".join(p for p in parts if p)
