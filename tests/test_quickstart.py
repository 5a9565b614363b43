"""The README's first command: examples/quickstart.sh itself, through the installed console script, as a new user
runs it (the test environment has torch, so the export is verified against transformers too)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, cli_env


@pytest.mark.entry
def test_quickstart_script_runs_and_the_model_answers(tmp_path):
    env = cli_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                  ALPACA_CACHE_DIR=str(tmp_path / "cache"))  # the demo model is made from scratch too
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "quickstart.sh"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    kenya = lines.index('$ alpaca generate "What is the capital of Kenya?"')
    assert lines[kenya + 1] == "The capital of Kenya is Nairobi."
    assert "children" in lines[kenya + 2:]
    assert any(line.startswith("verify: largest |logit difference|") for line in lines)
    # `alpaca eval --data demo`: the built-in records it memorised, every answer stopped by EOS
    row = next(line for line in lines if line.startswith("│ step-119 "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[1] == "48" and float(cells[3]) < 0.05 and cells[5] == "100.0% (48/48)", row
    # a user sees results and progress, not our internals or a library's
    for noise in ("Traceback", "Prompt lengths", "Added special tokens", "WARNING", "Error:"):
        assert noise not in out, noise
    assert sorted(os.listdir(tmp_path)) == ["cache", "run"]  # nothing written to the working directory
