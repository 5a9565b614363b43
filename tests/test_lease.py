"""One writer per run directory: a second `alpaca` command that would write a run another one is writing is refused
in one line that names the first, and writes nothing; a lease whose holder is dead (killed, or silent for too long on
another host) is taken over with a warning; a holder that lost its lease stops. On local disk and on gs:// (the GCS
emulator, which honours the generation preconditions the lease relies on)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest
from helpers import ALPACA, cli_env, error_line, free_port, launch, run_cli, wait_all

from alpaca_cli import io, lease
from alpaca_cli.errors import RunDirError
from alpaca_cli.lease import Holder, Lease, read_holder
from alpaca_cli.rundir import open_run

TRAIN = ["--model", "demo", "--seq-len", "256", "--batch-size", "16", "--steps", "20", "--precision", "p=f32,c=f32",
         "-q"]
PREPARE = ["prepare", "--data", "demo", "--tokenizer", "demo", "-q"]
HINT = "hint: wait for it to finish, or stop it; a lease whose holder is dead is taken over automatically"


@pytest.fixture(params=["local", "gcs"])
def where(request, tmp_path):
    """A fresh run directory URL, on local disk or on the GCS emulator."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('gcs').url}/lease/{uuid.uuid4().hex}/run"


def left_behind(lease_url: str, **fields) -> Holder:
    """A lease as another process left it (a plain write, as that process would have made it)."""
    holder = dataclasses.replace(Holder.me("alpaca train"), **fields)
    io.write_text_atomic(lease_url, holder.encode().decode())
    return holder


def ago(seconds: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")


def snapshot(url: str) -> dict:
    """Every file under url with what changes when it is written (local: size and mtime; gs://: generation)."""
    fs, path = io.fs_and_path(url)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)
    fs.invalidate_cache()  # (gcsfs would answer later reads from this listing)
    return {name: (info.get("generation") or (info["size"], info.get("mtime"))) for name, info in found.items()}


def steps_in_metrics(run: str) -> list[int]:
    return [json.loads(line)["step"] for line in io.read_text(f"{run}/metrics.jsonl").splitlines() if line]


# -- what a user sees ----------------------------------------------------------------------------------------------


@pytest.mark.entry
def test_a_second_train_on_a_run_being_trained_is_refused_and_the_first_finishes(where):
    run = where
    env = cli_env()  # (the gcs fixture has put the emulator's variables in the environment)
    run_cli([*PREPARE, "--run-dir", run], env=env)
    first = subprocess.Popen([ALPACA, "train", "--run-dir", run, *TRAIN], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not io.exists(f"{run}/lease.json"):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        # paused while the others run, so that it surely is still running (a command takes 10-40 s to start here)
        os.killpg(first.pid, signal.SIGSTOP)
        before = snapshot(run)
        second = run_cli(["train", "--run-dir", run, *TRAIN], env=env, check=False)
        assert second.returncode == 1 and second.stdout == ""
        assert re.fullmatch(rf"Error: run {re.escape(run)} is in use by `alpaca train` \(pid {first.pid} on host "
                            rf"{re.escape(socket.gethostname())}, since \d\d:\d\d:\d\d, last sign of life \d+ s ago\)",
                            error_line(second)), second.stderr
        assert HINT in second.stderr
        if not io.is_remote(run):  # (once is enough: they read the lease the same way on gs://)
            status = run_cli(["status", "--run-dir", run], env=env)
            assert f"in use by `alpaca train` (pid {first.pid} on host" in status.stdout
            planned = run_cli(["train", "--run-dir", run, *TRAIN, "--dry-run", "--json"], env=env)
            assert json.loads(planned.stdout)["steps"] == 20  # --dry-run writes nothing, so it takes no lease
        assert snapshot(run) == before  # nothing written by the refused command (nor the plan)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "trained 20 steps" in out
    assert steps_in_metrics(run) == list(range(1, 21))  # each step once, in order: one writer
    assert not io.exists(f"{run}/lease.json")  # released


@pytest.mark.entry
def test_a_lease_left_by_a_killed_prepare_is_taken_over_by_the_next_one(tmp_path):
    run = str(tmp_path / "run")
    killed = subprocess.Popen([ALPACA, *PREPARE, "--run-dir", run], env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(f"{run}/lease.json"):
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert read_holder(f"{run}/lease.json").pid == killed.pid  # left behind

    again = run_cli([*PREPARE, "--run-dir", run])
    assert re.search(rf"run {re.escape(run)} was left in use by `alpaca prepare` \(pid {killed.pid} on host .*\), "
                     rf"which is dead \(its process {killed.pid} is gone\): taking it over", again.stderr), \
        again.stderr
    assert open_run(run).prepare.complete
    assert not os.path.exists(f"{run}/lease.json")


@pytest.mark.entry
@pytest.mark.exclusive  # two processes that must join within gloo's fixed 30 s
def test_on_a_pod_every_process_stops_with_the_writers_refusal(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    held = Lease(f"{run}/lease.json", run, "alpaca train").acquire()  # this test process is the live holder
    try:
        outs = wait_all(launch([*PREPARE, "--run-dir", run], free_port()))
    finally:
        held.release()
    assert [rc for rc, _, _ in outs] == [1, 1], outs
    for _, out, err in outs:
        assert f"Error: run {run} is in use by `alpaca train` (pid {os.getpid()} on host" in err, err
        assert out == ""
    assert os.listdir(run) == []  # nothing written (the lease, released, is gone too)


# -- the lease itself ----------------------------------------------------------------------------------------------


def test_a_stale_lease_of_another_host_is_taken_over_and_a_live_one_is_not(where, caplog):
    url = f"{where}/lease.json"
    live = left_behind(url, host="other-host", pid=4242, heartbeat=ago(lease.STALE_AFTER_SECONDS / 2))
    with pytest.raises(RunDirError, match=rf"run {re.escape(where)} is in use by `alpaca train` \(pid 4242 on host "
                                          r"other-host, since .*, last sign of life \d+ s ago\)"):
        Lease(url, where, "alpaca export").acquire()
    assert read_holder(url) == live  # untouched

    left_behind(url, host="other-host", pid=4242, heartbeat=ago(lease.STALE_AFTER_SECONDS + 60))
    with caplog.at_level(logging.WARNING, logger="alpaca_cli.lease"):
        mine = Lease(url, where, "alpaca export").acquire()
    try:
        assert read_holder(url).token == mine.holder.token
        assert re.search(r"was left in use by `alpaca train` \(pid 4242 on host other-host.*\), which is dead "
                         r"\(no sign of life for \d+ min\): taking it over", caplog.text), caplog.text
    finally:
        mine.release()
    assert read_holder(url) is None


def test_a_live_process_on_this_host_keeps_its_lease_however_old_its_start(tmp_path):
    url = str(tmp_path / "lease.json")
    left_behind(url, pid=os.getppid(), taken=ago(86400))  # alive (our parent), heartbeat fresh
    with pytest.raises(RunDirError, match=rf"in use by `alpaca train` \(pid {os.getppid()} on host "
                                          rf"{re.escape(socket.gethostname())}, since \d{{4}}-"):
        Lease(url, str(tmp_path), "alpaca train").acquire()


@pytest.mark.parametrize("left", ["no lease", "a dead lease"])
def test_commands_starting_at_once_one_wins(where, left):
    """Twelve at once, three times: on a fresh run (they all create the lease) and on a dead holder's lease (they
    all take it over)."""
    url = f"{where}/lease.json"
    for _ in range(3):
        if left == "a dead lease":
            left_behind(url, host="gone-host", heartbeat=ago(lease.STALE_AFTER_SECONDS + 60))
        start, winners, refused = threading.Barrier(12), [], []

        def take(start=start, winners=winners, refused=refused):
            start.wait()
            try:
                winners.append(Lease(url, where, "alpaca train").acquire())
            except RunDirError as e:
                refused.append(str(e))

        threads = [threading.Thread(target=take) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1 and len(refused) == 11, (len(winners), refused[:1])
        assert read_holder(url).token == winners[0].holder.token
        assert all("is in use by `alpaca train`" in r for r in refused)
        winners[0].release()


def test_a_writer_whose_lease_was_taken_over_stops_at_its_next_write(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    run = open_run(str(tmp_path / "run"), create=True)
    with pytest.raises(RunDirError, match="was taken over by `alpaca export` .* while this command was writing it"):
        with run.lease("train"):
            run.save()
            other = left_behind(run.lease_path, command="alpaca export", pid=4242, host="other-host")
            deadline = time.time() + 10
            while "stops at its next write" not in caplog.text:  # the heartbeat notices
                assert time.time() < deadline
                time.sleep(0.02)
            manifest = io.read_text(run.manifest_path)
            with pytest.raises(RunDirError, match="was taken over"):
                run.save()
            assert io.read_text(run.manifest_path) == manifest  # not written
    assert read_holder(run.lease_path) == other  # the new holder's lease stays


@pytest.mark.parametrize("ending", ["success", "error", "ctrl-c"])
def test_the_lease_is_released_however_the_command_ends(where, ending):
    run = open_run(where, create=True)
    raised = {"success": None, "error": RunDirError("bad input"), "ctrl-c": KeyboardInterrupt()}[ending]
    try:
        with run.lease("prepare"):
            assert read_holder(run.lease_path).command == "alpaca prepare"
            if raised is not None:
                raise raised
    except (RunDirError, KeyboardInterrupt) as e:
        assert e is raised
    assert read_holder(run.lease_path) is None
    with run.lease("train"):  # and the next command takes it
        assert read_holder(run.lease_path).command == "alpaca train"
