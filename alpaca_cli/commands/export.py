"""`alpaca export`: the trained checkpoint as a Hugging Face checkpoint, optionally verified and pushed to the Hub."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from alpaca_cli.config import ExportConfig
from alpaca_cli.options import ConfigOpt, CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, RunDirOpt, SetOpt, describe

EXAMPLES = """\b
Examples:
  alpaca export --run-dir runs/llama2-alpaca --verify
  alpaca export --run-dir runs/llama2-alpaca --push-to-hub --repo-id me/llama2-alpaca --private
  alpaca export --run-dir gs://bucket/runs/alpaca --output gs://bucket/exports/alpaca --dtype bfloat16
  alpaca export --run-dir runs/x --step 499                    a kept checkpoint instead of the final one
  alpaca export --run-dir runs/x --overwrite                   replace the run's earlier export (RUN/hf)
The Hub token comes from HF_TOKEN or `huggingface-cli login`; it is never printed or stored.
"""


def export(
    run_dir: RunDirOpt = None,
    output: Annotated[
        Optional[str], typer.Option(help="Where to write the checkpoint (local or gs://). Default: RUN/hf.", show_default=False)
    ] = None,
    step: Annotated[
        Optional[int],
        typer.Option(help="Export RUN/checkpoints/step-N instead of the final checkpoint.", show_default=False),
    ] = None,
    dtype: Annotated[
        Optional[str], typer.Option(help="float32, bfloat16 or float16. Default: the base model's.", show_default=False)
    ] = None,
    max_shard_size: Annotated[
        Optional[str],
        typer.Option(help=describe("Largest safetensors file, e.g. 5GB.", ExportConfig, "max_shard_size"),
                     show_default=False),
    ] = None,
    push_to_hub: Annotated[bool, typer.Option("--push-to-hub", help="Upload the export to the Hugging Face Hub.")] = False,
    repo_id: Annotated[
        Optional[str], typer.Option(help="Hub repo. Default: <your user>/<run name>.", show_default=False)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo private.")] = False,
    revision: Annotated[
        Optional[str], typer.Option(help="Branch to upload to (created if missing). Default: main.", show_default=False)
    ] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Hub commit message.", show_default=False)] = None,
    adapter: Annotated[
        bool, typer.Option("--adapter", help="For a LoRA run: a PEFT adapter instead of the merged model.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Load the export with transformers (torch) and compare logits with Levanter's.")
    ] = False,
    verify_tolerance: Annotated[
        Optional[float],
        typer.Option(help="Largest allowed |logit difference|. Default: 1e-4 (float32), 5e-2 (16-bit).", show_default=False),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export of this run (never other files).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
) -> None:
    """Write the trained model as a Hugging Face checkpoint (and push it to the Hub)."""
    from alpaca_cli import config as cfgmod
    from alpaca_cli import distributed, rundir

    cfg = cfgmod.load_config(
        ExportConfig,
        config,
        set_,
        {
            "output": output,
            "step": step,
            "dtype": dtype,
            "max_shard_size": max_shard_size,
            "push_to_hub": push_to_hub or None,
            "repo_id": repo_id,
            "private": private or None,
            "revision": revision,
            "commit_message": commit_message,
            "adapter": adapter or None,
            "verify": verify or None,
            "verify_tolerance": verify_tolerance,
            "overwrite": overwrite or None,
        },
    )
    distributed.initialize(coordinator_address, num_processes, process_id)
    from alpaca_cli.core import export as core

    run = rundir.open_run(run_dir, writer=distributed.is_writer())
    t0 = time.time()
    with run.lease("export"):
        record = core.export(cfg, run)
    if record is not None:  # None: another host of the pod did the writing
        _report(run, record, time.time() - t0)


def _report(run, record, seconds: float) -> None:
    """The export's record: its figures on stderr, where it is (and its Hub URL) on stdout."""
    from alpaca_cli import console

    out, s = record.outputs, record.summary
    mb = 1024 * 1024
    console.stderr.print(
        f"exported step-{out.step} as {out.dtype}: {s.weight_bytes / mb:,.1f} MiB of weights, "
        f"peak host memory {s.peak_rss_bytes / mb:,.0f} MiB, {seconds:.1f} s"
    )
    if s.verify_max_abs_diff is not None:
        console.stderr.print(
            f"verify: largest |logit difference| {s.verify_max_abs_diff:.3g} (tolerance {s.verify_tolerance:g}) over "
            f"{s.verify_examples} examples; loss on their {s.verify_tokens} trained tokens: transformers "
            f"{s.verify_loss:.5f}, Levanter {s.verify_levanter_loss:.5f}"
        )
        if s.verify_eos_stop_rate is not None:
            console.stderr.print(f"verify: greedy answers to their prompts end with EOS in {s.verify_eos_stopped} of "
                                 f"{s.verify_examples} (within {s.verify_eos_max_new_tokens} tokens)")
    typer.echo(run.resolve(out.export_dir))
    if out.repo_url:
        typer.echo(out.repo_url)
