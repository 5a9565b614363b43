"""benchmarks/gpu_check.sh --cpu: the GPU check run end to end on CPU with a tiny model, so that the script cannot
fail on a typo when a GPU is finally there (its speed figures are printed, never asserted)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.entry
def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out), "--cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    parts = ["env", "data", "packing", "train_remat_off", "train_remat_on", "plan_remat_off", "plan_remat_on",
             "torch_remat_off", "torch_remat_on"]
    assert [p for p in parts if p not in results or "error" in results[p]] == []

    # the packing check compared something: several examples per row, equal within bfloat16's rounding, and the
    # unmasked control (examples attending to each other) told apart
    for seq_len, row in results["packing"]["lengths"].items():
        assert row["examples"] >= 2 and row["backend"] == "flash", (seq_len, row)
        assert row["packed_vs_alone_max_abs"] <= row["tolerance"] < row["unmasked_control_max_abs"], (seq_len, row)

    for remat in ("off", "on"):
        train, plan = results[f"train_remat_{remat}"], results[f"plan_remat_{remat}"]
        assert train["tokens_per_second"] > 0 and train["steps_timed"] == 2
        # on CPU the compiled plan (abstract shapes, core/target_compile.py) and the real step compiled by the
        # trainer are the same program: their memory must agree
        assert plan["predicted_gib"] == pytest.approx(train["gpu_compiler_memory_gib"], rel=0.05, abs=2e-3)
        assert results[f"torch_remat_{remat}"]["tokens_per_second"] > 0
    # remat keeps fewer activations: the compiled step needs less memory
    assert results["plan_remat_on"]["temporaries_gib"] < results["plan_remat_off"]["temporaries_gib"]

    table = (out / "gpu_check.md").read_text()
    assert "| alpaca (Levanter, packed) | on |" in table and "All parts passed." in table
