"""`alpaca generate`: ask the fine-tuned model something, or answer a whole file of requests (AlpacaEval's format)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated, Optional

import typer

from alpaca_cli.config import GENERATE_FLAGS, Settings
from alpaca_cli.options import CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, QuietOpt, RunDirOpt, config_options

EXAMPLES = """\b
Examples:
  alpaca generate "Give three tips for staying healthy." --run-dir runs/llama2-alpaca
  alpaca generate "Translate to French." --input "Good morning" --temperature 0.7 --seed 1
  alpaca generate --file alpaca_eval.json --output outputs.json --alpaca-eval --run-dir runs/x
      (AlpacaEval's 805 prompts, its alpaca-7b decoding; rerun after a kill to continue)
  alpaca generate "Name a primary color." --from-export runs/x/hf
  alpaca generate --file prompts.jsonl --output base.jsonl --base --run-dir runs/x     (the base model's answers)
  alpaca generate --file prompts.jsonl --config decoding.yaml --set top_p=0.9           (decoding from a file)
  alpaca generate --messages chat.json --run-dir runs/chat      (the next assistant turn, with the run's template)
  alpaca generate --messages chats.jsonl --output answers.jsonl --run-dir runs/chat      (a file of conversations)
On a pod, run the same command on every host: they decode together (the model sharded over all of them); host 0 writes.
"""


@config_options(GENERATE_FLAGS)
def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction.", show_default=False)] = None,
    run_dir: RunDirOpt = None,
    input: Annotated[Optional[str], typer.Option("--input", help="Optional input for the instruction.", show_default=False)] = None,
    file: Annotated[
        Optional[str],
        typer.Option("--file", help="A JSON list or JSONL of {instruction, input?} records (Alpaca records, or "
                     "AlpacaEval's eval set) to answer.", show_default=False),
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option(help="With --file: write here, .json (AlpacaEval's list) or .jsonl. Resumes after a kill. "
                     "Default: JSONL on stdout.", show_default=False),
    ] = None,
    generator: Annotated[
        Optional[str], typer.Option(help="The `generator` name in the output. Default: the run's name.",
                                    show_default=False)
    ] = None,
    from_export: Annotated[
        Optional[str],
        typer.Option(help="Use an exported Hugging Face folder instead of the run's checkpoint.", show_default=False),
    ] = None,
    step: Annotated[Optional[int], typer.Option(help="Use RUN/checkpoints/step-N.", show_default=False)] = None,
    base: Annotated[bool, typer.Option("--base", help="Answer with the run's base model (as training started).")] = False,
    settings: Settings = None,  # the flags of GENERATE_FLAGS, --config and --set (config_options)
    quiet: QuietOpt = False,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
) -> None:
    """Answer an instruction (or a file of them, or conversations) with the run's template."""
    from alpaca_cli import console, distributed, io, rundir
    from alpaca_cli.config import GenerateConfig, generate_derived_defaults
    from alpaca_cli.core import generate as core
    from alpaca_cli.errors import ConfigError

    decoding = settings.resolve(GenerateConfig, derived_defaults=generate_derived_defaults)
    _check_inputs(instruction, file, decoding.messages, output, base, from_export)
    if decoding.messages:
        decoding.messages = io.normalize(decoding.messages)
    if output:
        output = io.normalize(output)
        if not output.endswith(core.OUTPUT_FORMATS):
            raise ConfigError(f"--output {output}: use a .json (AlpacaEval) or .jsonl file name")
    distributed.initialize(coordinator_address, num_processes, process_id)
    # several processes (a pod's hosts): all of them decode together, over all their devices; process 0 reads the
    # requests (the others get them from it), prints and writes
    writer = distributed.is_writer()
    run = None
    if from_export is None or run_dir is not None:
        run = rundir.open_run(run_dir, writer=writer)
    name = generator or ((run.name + ("-base" if base else "")) if run is not None
                         else from_export.rstrip("/").rsplit("/", 1)[-1])
    requests = _requests(instruction, input, file, decoding.messages, output, name)
    gen = core.load_generator(run, from_export=from_export, step=step, base=base)
    if file is None and (decoding.messages is None or len(requests) == 1 and not output):
        text = gen.generate(requests, decoding)[0].text
        if writer:
            typer.echo(text)
    elif output:
        answered, resumed = core.answer_file(gen, requests, decoding, output, name, console.BarProgress(quiet))
        if writer:
            console.stderr.print(f"{answered + resumed} answers in {output}"
                                 + (f" ({resumed} from an earlier, interrupted run)" if resumed else ""))
    else:
        answers = gen.generate(requests, decoding)
        if writer:
            for r, a in zip(requests, answers):
                sys.stdout.write(json.dumps(core.output_record(r, a, name), ensure_ascii=False) + "\n")


def _check_inputs(instruction, file, messages, output, base, from_export) -> None:
    from alpaca_cli.errors import ConfigError

    if sum(x is not None for x in (instruction, file, messages)) != 1:
        raise ConfigError("give one of an INSTRUCTION, --file or --messages")
    if instruction is not None and not instruction.strip():
        raise ConfigError("the instruction is empty", hint='give the text to answer, e.g. alpaca generate "Name a color."')
    if output and not (file or messages):
        raise ConfigError("--output goes with --file or --messages")
    if base and from_export:
        raise ConfigError("--base and --from-export name different models; give one")


def _requests(instruction, input, file, messages, output, name) -> list:
    """The instruction as one request, or the --file's or --messages' requests (read by process 0, sent to the
    others)."""
    from alpaca_cli import distributed
    from alpaca_cli.core import generate as core

    if not (file or messages):
        return [core.Request(instruction or "", input or "")]

    def read_requests():
        if output:  # before any work: never over a file generate did not write
            core.check_output(output, file or messages, name)
        return core.read_requests(file) if file else core.read_message_requests(messages)

    return distributed.on_writer(read_requests, encode=lambda rs: [dataclasses.asdict(r) for r in rs],
                                 decode=lambda rs: [core.Request(**r) for r in rs])
