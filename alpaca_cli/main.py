"""The `alpaca` command line: every command is registered here, and `main()` is the one error boundary."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer

from alpaca_cli import __version__
from alpaca_cli.commands import export, generate, inspect, prepare, status, train
from alpaca_cli.errors import AlpacaError

app = typer.Typer(
    name="alpaca",
    help=(
        "Turn a pretrained causal language model into an instruction follower, the way Stanford Alpaca did, "
        "on Levanter (JAX): prepare -> train -> export."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # tokens can end up in locals
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alpaca {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (Levanter's too) to stderr.")] = False,
) -> None:
    """Stanford-Alpaca-style instruction tuning on Levanter."""
    _setup_logging(verbose)


def _setup_logging(verbose: bool) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root_logger = logging.getLogger()
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("alpaca_cli").setLevel(logging.INFO)
    # Levanter warns "Unknown leaf type <class 'NoneType'>" for every empty optional field of a state it restores
    # from a checkpoint (levanter/tensorstore_serialization.py, _sharding_from_leaf); the warning is harmless.
    logging.getLogger("levanter.tensorstore_serialization").addFilter(
        lambda r: "Unknown leaf type <class 'NoneType'>" not in r.getMessage()
    )
    # ...and "No checkpoints found in ..." as a warning at the start of every fresh run.
    logging.getLogger("levanter.checkpoint").addFilter(lambda r: "No checkpoints found in" not in r.getMessage())


for _module in (prepare, inspect, train, export, generate, status):
    app.command(epilog=_module.EXAMPLES)(getattr(_module, _module.__name__.rsplit(".", 1)[-1]))


def format_error(e: AlpacaError) -> str:
    text = f"Error: {e.message}"
    if e.hint:
        text += f"\n  hint: {e.hint}"
    return text


def main() -> None:
    """Console entry point: handled failures print one line (and a hint) on stderr and exit 1."""
    try:
        app()
    except AlpacaError as e:
        if os.environ.get("ALPACA_DEBUG"):
            raise
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(format_error(e), style="red", markup=False)
        print("(set ALPACA_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
