"""`alpaca export`: the trained checkpoint as a Hugging Face checkpoint, optionally verified and pushed to the Hub."""

from __future__ import annotations

import typer

from alpaca_cli.config import EXPORT_FLAGS, Settings
from alpaca_cli.options import CoordinatorOpt, NumProcessesOpt, ProcessIdOpt, RunDirOpt, config_options

EXAMPLES = """\b
Examples:
  alpaca export --run-dir runs/llama2-alpaca --verify
  alpaca export --run-dir runs/llama2-alpaca --push-to-hub --repo-id me/llama2-alpaca --private
  alpaca export --run-dir gs://bucket/runs/alpaca --output gs://bucket/exports/alpaca --dtype bfloat16
  alpaca export --run-dir runs/x --step 499                    a kept checkpoint instead of the final one
  alpaca export --run-dir runs/x --overwrite                   replace the run's earlier export (RUN/hf)
The Hub token comes from HF_TOKEN or `huggingface-cli login`; it is never printed or stored.
"""


@config_options(EXPORT_FLAGS)
def export(
    run_dir: RunDirOpt = None,
    settings: Settings = None,  # the flags of EXPORT_FLAGS, --config and --set (config_options)
    coordinator_address: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
) -> None:
    """Write the trained model as a Hugging Face checkpoint (and push it to the Hub)."""
    from alpaca_cli import console, distributed, rundir
    from alpaca_cli.config import ExportConfig

    cfg = settings.resolve(ExportConfig)
    distributed.initialize(coordinator_address, num_processes, process_id)
    from alpaca_cli.core import export as core

    run = rundir.open_run(run_dir, writer=distributed.is_writer())
    with run.lease("export"):
        result = core.export(cfg, run)
    if result is None:  # another host of the pod did the writing
        return
    mb = 1024 * 1024
    console.stderr.print(
        f"exported step-{result.step} as {result.dtype}: {result.weight_bytes / mb:,.1f} MiB of weights, "
        f"peak host memory {result.peak_rss_bytes / mb:,.0f} MiB, {result.seconds:.1f} s"
    )
    if result.verify is not None:
        v = result.verify
        console.stderr.print(
            f"verify: largest |logit difference| {v.max_abs_diff:.3g} (tolerance {v.tolerance:g}) over {v.examples} "
            f"examples; loss on their {v.tokens} trained tokens: transformers {v.torch_loss:.5f}, Levanter {v.levanter_loss:.5f}"
        )
        if v.eos_stop_rate is not None:
            console.stderr.print(f"verify: greedy answers to their prompts end with EOS in {v.eos_stopped} of "
                                 f"{v.examples} (within {v.eos_max_new_tokens} tokens)")
    typer.echo(result.export_dir)
    if result.repo_url:
        typer.echo(result.repo_url)
