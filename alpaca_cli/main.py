"""The `alpaca` command line: every command is registered here, and `main()` is the one error boundary."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from alpaca_cli import __version__, interrupts, logs
from alpaca_cli.commands import evaluate, export, generate, inspect, prepare, status, train
from alpaca_cli import errors
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
    logs.setup(verbose)


COMMANDS = (
    ("prepare", prepare, prepare.prepare),
    ("inspect", inspect, inspect.inspect),
    ("train", train, train.train),
    ("export", export, export.export),
    ("generate", generate, generate.generate),
    ("eval", evaluate, evaluate.eval_),
    ("status", status, status.status),
)
for _name, _module, _command in COMMANDS:
    app.command(_name, epilog=_module.EXAMPLES)(_command)


def format_error(e: AlpacaError) -> str:
    text = f"Error: {e.message}"
    if e.hint:
        text += f"\n  hint: {e.hint}"
    return text


def main() -> None:
    """Console entry point, and the one error boundary: every failure is one `Error: ...` line (and a hint) on
    stderr, never a traceback (ALPACA_DEBUG=1 shows it). Handled failures and bugs exit 1, Ctrl-C 130."""
    interrupts.install()
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as e:
        # Typer turns Ctrl-C into a silent exit 130
        if isinstance(e, SystemExit) and e.code != 130:
            raise
        if os.environ.get("ALPACA_DEBUG"):
            raise
        _print_error(AlpacaError("interrupted", hint="run the same command again to continue"))
        sys.exit(130)
    except AlpacaError as e:
        if os.environ.get("ALPACA_DEBUG"):
            raise
        _print_error(errors.explain(e))
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the boundary: whatever escaped is reported in one line
        if os.environ.get("ALPACA_DEBUG"):
            raise
        _print_error(errors.explain(e))
        sys.exit(1)


def _print_error(e: AlpacaError) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(format_error(e), style="red", markup=False)
    print("(set ALPACA_DEBUG=1 for the traceback)", file=sys.stderr)


if __name__ == "__main__":
    main()
