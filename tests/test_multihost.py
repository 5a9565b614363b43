"""Several hosts, simulated: two processes on localhost with two CPU devices each (jax.distributed over gloo)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import all_succeeded, checkpoint_saved, cli_env, free_port, launch, run_cli, wait_all

from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.exclusive  # processes that must join within gloo's fixed 30 s, alone on the machine

TRAIN = ["--model", "demo", "--seq-len", "256", "--batch-size", "16", "--precision", "p=f32,c=f32", "-q"]


def read(url):
    from alpaca_cli import io

    return io.read_text(url)


def metrics(run):
    return [json.loads(line) for line in read(f"{run}/metrics.jsonl").splitlines() if line.strip()]


@pytest.mark.entry
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_processes_equal_one_process_with_four_devices(where, tmp_path, request):
    extra = {}
    if where == "gcs":
        gcs = request.getfixturevalue("gcs")
        extra = gcs.env()
        two, one = f"{gcs.url}/mh/{os.getpid()}/two", f"{gcs.url}/mh/{os.getpid()}/one"
    else:
        two, one = str(tmp_path / "two"), str(tmp_path / "one")
    train = ["train", *TRAIN, "--epochs", "3"]

    outs = wait_all(launch(["prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", two], free_port(), extra=extra))
    all_succeeded(outs)
    assert "records read" in outs[0][1] and outs[1][1] == ""  # one process reports, the other only waited
    outs = wait_all(launch([*train, "--run-dir", two], free_port(), extra=extra))
    all_succeeded(outs)
    assert "trained 9 steps" in outs[0][1] and outs[1][1] == ""

    run_cli(["prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", one, "-q"], env=cli_env(devices=4, **extra))
    run_cli([*train, "--run-dir", one], env=cli_env(devices=4, **extra))
    a, b = metrics(two), metrics(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 10))
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * max(1.0, abs(y["loss"]))

    run = open_run(two)
    for st in (run.prepare, run.train):
        assert st.complete and (st.writer.process_index, st.writer.process_count) == (0, 2)
    assert (run.train.plan.devices, run.train.plan.hosts) == (4, 2)
    from alpaca_cli import io

    assert io.exists(f"{two}/data/cache/shard_ledger.json")
    for name in io.listdir(f"{two}/checkpoints"):
        assert io.exists(f"{two}/checkpoints/{name}/metadata.json")  # every checkpoint complete

    # export on both hosts, as the README's GPU-cluster section runs it (flags, not environment variables):
    # one process writes it, the other waits for it
    outs = wait_all(launch(["export", "--run-dir", two], free_port(), extra=extra, flags=True))
    all_succeeded(outs)
    assert "exported step-8" in outs[0][2] and outs[0][1].strip().endswith("/hf")
    assert outs[1][1] == "" and "exported" not in outs[1][2]
    st = open_run(two).export
    assert st.complete and st.writer.process_index == 0
    assert sorted(io.listdir(f"{two}/hf")) == sorted(st.outputs.files)
    assert {"model.safetensors", "config.json"} <= set(st.outputs.files)


@pytest.mark.entry
def test_a_dead_host_stops_the_other_and_both_resume(tmp_path):
    run = str(tmp_path / "run")
    wait_all(launch(["prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", run, "-q"], free_port()))
    train = ["train", *TRAIN, "--epochs", "12", "--checkpoint-every", "10", "--run-dir", run]
    procs = launch(train, free_port())
    deadline = time.time() + 300
    while not checkpoint_saved(os.path.join(run, "checkpoints", "step-10")):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    out, err = procs[0].communicate(timeout=120)
    waited = time.time() - t0
    procs[1].wait()
    assert procs[0].returncode != 0
    assert waited < 60, waited  # bounded by ALPACA_HEARTBEAT_TIMEOUT (10 s here), not forever
    assert ("Error: training stopped on process 0 of 2" in err
            or "JAX distributed service detected fatal errors" in err), err[-2000:]

    outs = wait_all(launch(train, free_port()))
    all_succeeded(outs)
    assert "Resuming from the checkpoint after step" in outs[0][2]
    assert "trained 36 steps" in outs[0][1]
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 37))
