"""`alpaca generate`: ask the fine-tuned model something (or a whole file of requests)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.options import RunDirOpt

EXAMPLES = """\b
Examples:
  alpaca generate "Give three tips for staying healthy." --run-dir runs/llama2-alpaca
  alpaca generate "Translate to French." --input "Good morning" --temperature 0.7 --seed 1
  alpaca generate --file eval.jsonl --output responses.jsonl --run-dir runs/x     (AlpacaEval-style JSONL)
  alpaca generate "Name a primary color." --from-export runs/x/hf
"""


def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction.", show_default=False)] = None,
    run_dir: RunDirOpt = None,
    input: Annotated[Optional[str], typer.Option("--input", help="Optional input for the instruction.", show_default=False)] = None,
    file: Annotated[
        Optional[str],
        typer.Option("--file", help="JSONL (or JSON list) of {instruction, input?} records to answer.", show_default=False),
    ] = None,
    output: Annotated[
        Optional[str], typer.Option(help="With --file: write the JSONL here instead of stdout.", show_default=False)
    ] = None,
    from_export: Annotated[
        Optional[str],
        typer.Option(help="Use an exported Hugging Face folder instead of the run's checkpoint.", show_default=False),
    ] = None,
    step: Annotated[Optional[int], typer.Option(help="Use RUN/checkpoints/step-N.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate per response.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 8,
) -> None:
    """Generate responses with the fine-tuned model, prompted with the run's template."""
    import json
    import sys

    from alpaca_cli import io, rundir
    from alpaca_cli.core import generate as core
    from alpaca_cli.errors import ConfigError

    if (instruction is None) == (file is None):
        raise ConfigError("give an INSTRUCTION or --file, not both and not neither")
    if instruction is not None and not instruction.strip():
        raise ConfigError("the instruction is empty", hint='give the text to answer, e.g. alpaca generate "Name a color."')
    core.check_args(max_new_tokens, temperature)
    requests = core.read_requests(file) if file else [core.Request(instruction or "", input or "")]
    run = None
    if from_export is None or run_dir is not None:
        run = rundir.open_run(run_dir)
    gen = core.load_generator(run, from_export=from_export, step=step)
    responses = gen.generate(requests, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             batch_size=batch_size)
    if file is None:
        typer.echo(responses[0])
        return
    generator = run.name if run is not None else from_export.rstrip("/").rsplit("/", 1)[-1]
    lines = "".join(
        json.dumps({"instruction": r.instruction, "input": r.input, "output": o, "generator": generator},
                   ensure_ascii=False) + "\n"
        for r, o in zip(requests, responses)
    )
    if output:
        io.write_text_atomic(io.normalize(output), lines)
    else:
        sys.stdout.write(lines)
