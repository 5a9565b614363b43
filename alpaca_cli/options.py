"""Option aliases shared by the commands (one help text per concept), and the options made from a config's flag
table (`config_options`)."""

import functools
import inspect
from typing import Annotated, Any, Callable, Optional

import typer

from alpaca_cli.config import Flag, Flags, Settings, default_value, field_type, help_text

RunDirOpt = Annotated[
    Optional[str],
    typer.Option(
        "--run-dir",
        help="Run directory, a local path or gs://bucket/path. Default: $ALPACA_RUN_DIR, else ./alpaca-run.",
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


def config_options(table: Flags) -> Callable:
    """Decorator: the command's `settings` parameter becomes the table's flags (typed, help and defaults from the
    config fields), --config and --set; the command receives what was given as one `config.Settings`."""

    def decorate(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)  # Typer passes every parameter by name
               for p in inspect.signature(command, eval_str=True).parameters.values()]
        at = [p.name for p in own].index("settings")
        generated = [_parameter(table, f) for f in table] + _config_and_set(table)
        names = [p.name for p in generated]
        assert not set(names) & {p.name for p in own}, f"{command.__name__}: a flag's name is taken"

        @functools.wraps(command)
        def with_settings(**given: Any) -> Any:
            values = {f.key: given.pop(p) for f, p in zip(table, names)}
            settings = Settings(given.pop("config"), list(given.pop("set_") or []), table.given(values))
            return command(**given, settings=settings)

        parameters = own[:at] + generated + own[at + 1:]
        with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings

    return decorate


def _parameter(table: Flags, f: Flag) -> inspect.Parameter:
    kind = f.type or field_type(table.cls, f.key)
    # a setting on by default is turned off with --no-X; one off by default is a plain --X (absent: not given)
    decl = f"{f.flag}/{f.off}" if kind is bool and default_value(table.cls, f.key) else f.flag
    option = typer.Option(decl, help=help_text(table, f), show_default=False, min=f.min)
    return inspect.Parameter(f.flag[2:].replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _config_and_set(table: Flags) -> list[inspect.Parameter]:
    config = typer.Option("--config", "-c", help="YAML config file (local or remote). --set and flags override it.",
                          show_default=False)
    set_ = typer.Option("--set", help=f"Override one config key, e.g. --set {table.set_example} (repeatable). Beats "
                        "--config, loses to flags.", show_default=False)
    return [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[str], config]),
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[list[str]], set_])]
