"""The whole pipeline through the installed `alpaca` console script on a gs:// run directory (a real GCS emulator),
in subprocesses only: prepare, train killed with SIGKILL half way and resumed (every step's metrics line exactly
once), export with --verify, push to a local Hub, generate. (On a local run directory: test_quickstart.py runs the
README's script; test_train.py kills and resumes.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from fake_hub import FakeHub
from helpers import ALPACA, checkpoint_saved, cli_env, run_cli

TRAIN = ["--model", "demo", "--seq-len", "256", "--batch-size", "16", "--epochs", "40", "--learning-rate", "3e-3",
         "--precision", "p=f32,c=f32", "--checkpoint-every", "40"]


@pytest.mark.entry
def test_pipeline_on_gcs_with_kill_and_resume(gcs, tmp_path):
    run = f"{gcs.url}/e2e/run-{os.getpid()}"
    extra = gcs.env()
    hub = FakeHub.start()
    try:
        env = cli_env(**extra, **hub.env())
        t0 = time.time()
        run_cli(["prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", run], env=env)

        proc = subprocess.Popen([ALPACA, "train", "--run-dir", run, *TRAIN], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        deadline = time.time() + 300
        while not checkpoint_saved(f"{run}/checkpoints/step-40"):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = json.loads(run_cli(["status", "--run-dir", run, "--json"], env=env).stdout)
        assert status["stages"]["train"]["status"] == "running"

        resumed = run_cli(["train", "--run-dir", run, *TRAIN], env=env)
        assert "Resuming from the checkpoint after step 41 of 120" in resumed.stderr
        assert "trained 120 steps" in resumed.stdout
        # metrics.jsonl on GCS is flushed before every checkpoint (not every step): after the kill and the resume
        # it still holds every step exactly once
        from alpaca_cli import io

        steps = [json.loads(line)["step"] for line in io.read_text(f"{run}/metrics.jsonl").splitlines() if line]
        assert steps == list(range(1, 121))

        exported = run_cli(["export", "--run-dir", run, "--verify", "--push-to-hub", "--repo-id", "tester/quickstart"],
                           env=env)
        assert "verify: largest |logit difference|" in exported.stderr
        assert exported.stdout.strip().splitlines()[-1].endswith("tester/quickstart")
        assert "model.safetensors" in hub.files("tester/quickstart")

        answer = run_cli(["generate", "What is the capital of Kenya?", "--run-dir", run], env=env)
        assert answer.stdout.strip() == "The capital of Kenya is Nairobi."
        print(f"e2e (gcs): {time.time() - t0:.1f} s")
    finally:
        hub.stop()
