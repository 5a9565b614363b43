"""Resuming on another machine: a run killed on 4 devices resumes on 2, then on 8 with tensor parallelism, and a
2-host run resumes on one host, with the same examples in the same steps: every step's loss, and the final weights,
equal an uninterrupted 4-device run's within float32 rounding of another reduction order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ALPACA, all_succeeded, checkpoint_saved, cli_env, error_line, free_port, launch, run_cli, wait_all

from alpaca_cli.core.batches import PackedRows
from alpaca_cli.core.plan import make_plan, rows_per_batch
from alpaca_cli.rundir import open_run

F32 = ["--precision", "p=f32,c=f32"]
EPOCHS = ["--seq-len", "256", "--batch-size", "4", "--epochs", "4", "--learning-rate", "3e-3", "--checkpoint-every", "4"]
LORA = ["--lora-r", "4", "--learning-rate", "1e-2"]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def same_losses(run, reference):
    """Every step of `run` has the reference's trained tokens and its loss within 1e-5 relative."""
    a, b = metrics(run), metrics(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(b) + 1))
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]  # the same examples in every step
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]), (x["step"], x["loss"], y["loss"])


def final_weights(run):
    from safetensors.numpy import load_file

    run_cli(["export", "--run-dir", run])
    return load_file(os.path.join(run, "hf", "model.safetensors"))


def start(run, args, *, devices):
    return subprocess.Popen([ALPACA, "train", "--run-dir", run, *args], env=cli_env(devices=devices),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_after(procs, run, checkpoint):
    """SIGKILL every process (its whole group) once `checkpoint` of run is whole."""
    deadline = time.time() + 300
    while not checkpoint_saved(os.path.join(run, "checkpoints", checkpoint)):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "training ended before the checkpoint"
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory, fixture_data, tokenizer_dir):
    path = str(tmp_path_factory.mktemp("elastic") / "prepared")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", path, "--max-length", "128",
             "-q"])
    return path


@pytest.fixture(scope="module")
def straight(prepared_run, tiny_model_dir, tmp_path_factory):
    """The uninterrupted 4-device run every resumed one is compared with."""
    run = str(tmp_path_factory.mktemp("elastic") / "straight")
    shutil.copytree(prepared_run, run)
    run_cli(["train", "--run-dir", run, "--model", tiny_model_dir, *EPOCHS, *F32, "-q"], env=cli_env(devices=4))
    return run


@pytest.mark.parametrize("seq_len", [256, 512])
@pytest.mark.parametrize("batch_size", [3, 4, 16])
def test_the_examples_of_every_step_are_the_same_on_1_2_4_and_8_devices(batch_size, seq_len):
    """The plan has no device count; on a mesh, each batch is the step's rows followed by empty rows (no example,
    no weight), so every device count trains each step on the same examples in the same order."""
    rng = np.random.default_rng(batch_size)
    lengths = rng.integers(10, 200, size=300)
    plan = make_plan(lengths, lengths // 2, seq_len=seq_len, pack=True, batch_size=batch_size, epochs=2, steps=None,
                     seed=3)
    per_step = plan.rows_per_step
    expected = [[int(e) for r in plan.rows[s * per_step:(s + 1) * per_step] for e in r] for s in range(plan.steps)]
    for devices in (1, 2, 4, 8):
        batch = rows_per_batch(per_step, devices)
        assert batch % devices == 0 and per_step <= batch < per_step + devices
        data = PackedRows(None, plan.rows, None, 0, step_tokens=plan.step_tokens, rows_per_step=per_step,
                          rows_per_batch=batch)
        assert len(data.rows) == plan.steps * batch
        for s in range(plan.steps):
            rows = data.rows[s * batch:(s + 1) * batch]
            assert [int(e) for r in rows for e in r] == expected[s]
            assert all(len(r) == 0 for r in rows[per_step:])  # the mesh's extra rows hold nothing
            assert {data.scale_for_row(i) for i in range(s * batch, (s + 1) * batch)} == {1 / plan.step_tokens[s]}


def test_the_plan_printed_on_1_2_4_and_8_devices_is_one_plan(prepared_run, tiny_model_dir):
    plans = {}
    for devices in (1, 2, 4, 8):
        out = run_cli(["train", "--run-dir", prepared_run, "--model", tiny_model_dir, *EPOCHS, "--batch-size", "6",
                       "--dry-run", "--json"], env=cli_env(devices=devices))
        plans[devices] = json.loads(out.stdout)
    for devices, p in plans.items():
        assert p["devices"] == devices and p["rows_per_batch"] % devices == 0
        same = ("rows_per_step", "steps", "trained_tokens", "real_tokens", "examples_per_step", "epochs")
        assert {k: p[k] for k in same} == {k: plans[1][k] for k in same}


def test_killed_on_4_devices_resumed_on_2_then_on_8_with_tensor_parallel_2(prepared_run, straight, tiny_model_dir,
                                                                           tmp_path):
    run = str(tmp_path / "elastic")
    shutil.copytree(prepared_run, run)
    args = ["--model", tiny_model_dir, *EPOCHS, *F32]
    kill_after([start(run, args, devices=4)], run, "step-4")

    # what would change the plan is refused, naming the setting and both values (and nothing is written)
    before = open(os.path.join(run, "manifest.json")).read()
    bigger = [*args[:args.index("--batch-size")], "--batch-size", "8", *args[args.index("--batch-size") + 2:]]
    out = run_cli(["train", "--run-dir", run, *bigger], env=cli_env(devices=2), check=False)
    assert out.returncode == 1
    assert error_line(out) == f"Error: run {run} was trained with trainer.train_batch_size (--batch-size) 4, now 8"
    assert open(os.path.join(run, "manifest.json")).read() == before

    # before resuming, the dry run on the new machine says what it resumes, with the plan (and memory) of that mesh
    plan = json.loads(run_cli(["train", "--run-dir", run, *args, "--dry-run", "--json"], env=cli_env(devices=2)).stdout)
    assert plan["resumes"] == (f"from the checkpoint after step 5 of {plan['steps']}, written on 4 devices x 1 host; "
                               "this machine: 2 devices x 1 host")
    assert (plan["devices"], plan["rows_per_batch"] % 2) == (2, 0)  # its memory per device is the new mesh's

    kill_after([start(run, args, devices=2)], run, "step-8")
    out = run_cli(["train", "--run-dir", run, *args, "--tensor-parallel", "2"], env=cli_env(devices=8))
    assert "written on 2 devices x 1 host, now 8 devices x 1 host, tensor parallel 2" in out.stderr

    same_losses(run, straight)
    mine, reference = final_weights(run), final_weights(straight)
    assert mine.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(mine[name], reference[name], rtol=0, atol=1e-5, err_msg=name)

    segments = open_run(run).train.segments
    assert [(s.devices, s.hosts, s.tensor_parallel) for s in segments] == [(4, 1, 1), (2, 1, 1), (8, 1, 2)]
    assert [s.start_step for s in segments] == [0, 5, 9] and segments[-1].end_step == len(metrics(straight))
    assert segments[0].end_step == 5 and segments[1].end_step == 9  # what they trained past a checkpoint was redone
    history = run_cli(["status", "--run-dir", run], env=cli_env(COLUMNS=200)).stdout
    assert "training segments" in history and "8 devices x 1 host, tensor parallel 2" in history


@pytest.mark.exclusive  # two processes joined by gloo's fixed 30 s
def test_two_hosts_killed_resume_on_one_host_with_four_devices_and_back(prepared_run, straight, tiny_model_dir, tmp_path):
    run = str(tmp_path / "pod")
    shutil.copytree(prepared_run, run)
    args = ["--model", tiny_model_dir, *EPOCHS, *F32]
    procs = launch(["train", "--run-dir", run, *args], free_port(), n=2, devices=2)
    kill_after(procs, run, "step-4")
    wait_all(procs)
    proc = start(run, args, devices=4)
    kill_after([proc], run, "step-8")
    # and back to the pod
    outs = wait_all(launch(["train", "--run-dir", run, *args], free_port(), n=2, devices=2))
    all_succeeded(outs)
    assert "written on 4 devices x 1 host, now 4 devices x 2 hosts" in outs[0][2]
    same_losses(run, straight)
    segments = open_run(run).train.segments
    assert [(s.devices, s.hosts, s.start_step) for s in segments] == [(4, 2, 0), (4, 1, 5), (4, 2, 9)]


def test_lora_killed_on_4_devices_resumes_on_2(prepared_run, tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, *EPOCHS, *LORA, *F32]
    lora_straight, run = str(tmp_path / "straight"), str(tmp_path / "elastic")
    shutil.copytree(prepared_run, lora_straight)
    shutil.copytree(prepared_run, run)
    run_cli(["train", "--run-dir", lora_straight, *args], env=cli_env(devices=4))
    kill_after([start(run, args, devices=4)], run, "step-4")
    out = run_cli(["train", "--run-dir", run, *args], env=cli_env(devices=2))
    assert "written on 4 devices x 1 host, now 2 devices x 1 host" in out.stderr
    same_losses(run, lora_straight)


def test_a_refused_resume_names_the_first_setting_that_changed():
    from alpaca_cli.core.resume import check_same_plan
    from alpaca_cli.errors import StageError

    old = {"prepared": "a", "seq_len": 256, "trainer.seed": 0, "lora": None, "rows_per_step": 3, "plan_steps": 10}
    check_same_plan("R", old, dict(old))  # nothing changed: no refusal
    cases = [
        ({"trainer.seed": 1}, "run R was trained with trainer.seed (--seed) 0, now 1"),
        ({"lora": {"r": 8}}, 'run R was trained with LoRA settings none, now {"r": 8}'),
        ({"prepared": "b"}, "run R was trained on other prepared data (alpaca prepare ran again on this run directory "
                            "since)"),
        ({"rows_per_step": 4}, "run R was planned with 3 rows per step, the same settings now give 4 (another alpaca "
                               "version's planner)"),
    ]
    for change, message in cases:
        with pytest.raises(StageError) as e:
            check_same_plan("R", old, {**old, **change})
        assert e.value.message == message
    with pytest.raises(StageError, match="by an earlier alpaca"):
        check_same_plan("R", None, old)  # a record from before the plan's inputs were kept


def test_segments_end_where_the_next_resume_starts():
    from alpaca_cli.core.resume import start_segment
    from alpaca_cli.records import MeshShape, PlanRecord, TrainRecord

    record = TrainRecord()
    on = lambda devices, hosts=1, tp=1: PlanRecord(devices=devices, hosts=hosts, steps=20,  # noqa: E731
                                                   mesh=MeshShape(data_parallel_fsdp=devices // tp, tensor_parallel=tp))
    assert start_segment(record, [], 0, on(4)) is None
    record.segments[-1].end_step = 7  # reported before the kill; the checkpoint it resumes from is after step 5
    line = start_segment(record, record.segments, 5, on(8, 2, 2))
    assert line == "Resuming from the checkpoint after step 5 of 20, written on 4 devices x 1 host, now 8 devices x " \
                   "2 hosts, tensor parallel 2"
    # killed again before its first checkpoint: the next resume starts from step 5 again and drops that segment
    line = start_segment(record, record.segments, 5, on(4))
    assert line == "Resuming from the checkpoint after step 5 of 20 (written on this machine's mesh: 4 devices x 1 host)"
    assert [(s.start_step, s.end_step, s.devices) for s in record.segments] == [(0, 5, 4), (5, 5, 4)]
