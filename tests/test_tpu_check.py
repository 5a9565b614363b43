"""benchmarks/tpu_check.sh --cpu: the TPU check run end to end on CPU with a tiny model (its train part on this CPU,
its plan for one TPU v5e chip: XLA:TPU deviceless where libtpu is installed, else XLA:CPU's estimate), so that the
script cannot fail on a typo when a TPU VM is finally there (speed is printed, never asserted)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.entry
def test_tpu_check_runs_every_part_on_cpu(tmp_path):
    from alpaca_cli.core.target_compile import tpu_compiler_available

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "tpu_check.sh"), str(out), "--cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    parts = ["env", "data", "train_remat_off", "train_remat_on", "plan_remat_off", "plan_remat_on"]
    assert [p for p in parts if p not in results or "error" in results[p]] == []
    for remat in ("off", "on"):
        train, plan = results[f"train_remat_{remat}"], results[f"plan_remat_{remat}"]
        assert train["tokens_per_second"] > 0 and train["steps_timed"] == 2
        assert plan["target"] == "tpu:v5e:1x1" and plan["predicted_gib"] > 0
        assert plan["compiler"] == ("XLA:TPU" if tpu_compiler_available() else "XLA:CPU")
    table = (out / "gpu_check.md").read_text()
    assert "| alpaca (Levanter, packed) | on |" in table and "All parts passed." in table
