"""`alpaca export`: the trained checkpoint as a Hugging Face checkpoint, optionally verified and pushed to the Hub."""

from __future__ import annotations

import time

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
    from alpaca_cli import distributed, rundir
    from alpaca_cli.config import ExportConfig

    cfg = settings.resolve(ExportConfig)
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
