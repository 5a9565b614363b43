"""alpaca prepare --ray-address on a real local Ray cluster of two nodes (`ray start --head`, then a second
`ray start --address`): the same cache as one process, a killed worker retried, and a worker that always dies fails
the prepare in one line without a cache that looks complete. Without the flag nothing imports Ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import read_records
from test_prepare_parallel import cache_digest, comparable, run_prepare, shrink_chunks, synthetic_records, write_lines

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import parallel
from alpaca_cli.core.tokenize import hash_folder
from alpaca_cli.errors import ConfigError, DataError, StageError
from alpaca_cli.rundir import open_run

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# the smallest object store Ray accepts: two nodes on a machine of tests
NODE = ["--num-cpus=1", "--object-store-memory=80000000", "--disable-usage-stats"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def alpaca_file(tmp_path, fixture_data):
    records = read_records(fixture_data) + synthetic_records(50)
    return write_lines(tmp_path / "alpaca.jsonl", records), records


def ray_cli(*args: str, log) -> None:
    """`ray ...`, its output into log (not a pipe: the daemons it starts would hold a pipe open)."""
    subprocess.run([RAY, *args], check=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"), stdout=log,
                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and a second node on this machine, one CPU each; its address."""
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("ray") / "ray.log", "w")
    try:
        ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *NODE, log=log)
        ray_cli("start", f"--address={address}", *NODE, log=log)
        ray.init(address=address, logging_level="WARNING")
        try:
            deadline = time.time() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
                time.sleep(1)
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            assert ray.cluster_resources()["CPU"] == 2
        finally:
            ray.shutdown()
        yield address
    finally:
        ray_cli("stop", "--force", log=log)
        log.close()


def test_the_cluster_prepares_the_one_process_cache(tmp_path, alpaca_file, tokenizer_dir, monkeypatch, cluster):
    path, _ = alpaca_file
    one_result, one = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    result, run = run_prepare(tmp_path, "ray", path, tokenizer_dir, ray_address=cluster)
    assert cache_digest(run) == cache_digest(one)
    assert comparable(result.stats) == comparable(one_result.stats)


def test_a_mixture_on_the_cluster_is_the_local_mixture(tmp_path, alpaca_file, tokenizer_dir, monkeypatch, cluster):
    from alpaca_cli.config import SourceConfig
    from alpaca_cli.core.prepare_sources import prepare_sources

    path, _ = alpaca_file
    other = write_lines(tmp_path / "other.jsonl", synthetic_records(40, seed=3))
    shrink_chunks(monkeypatch, path)

    def mix(name, **kw):
        run = open_run(str(tmp_path / name), create=True)
        cfg = PrepareConfig(data=path, tokenizer=tokenizer_dir, sources=[
            SourceConfig(data=path, name="a", weight=3.0), SourceConfig(data=other, name="b", weight=1.0)], **kw)
        return prepare_sources(cfg, run), run

    local, local_run = mix("local", workers=0)
    on_ray, ray_run = mix("ray", ray_address=cluster)
    assert cache_digest(ray_run) == cache_digest(local_run)
    assert [s.rows for s in ray_run.prepare.sources] == [s.rows for s in local_run.prepare.sources]
    assert comparable(on_ray.stats) == comparable(local.stats)


def test_a_killed_ray_worker_is_retried_and_the_cache_is_identical(tmp_path, alpaca_file, tokenizer_dir, monkeypatch,
                                                                   cluster):
    path, _ = alpaca_file
    _, one = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    monkeypatch.setenv(parallel.FAULT_ENV, "kill:2:once")
    monkeypatch.setenv(parallel.FAULT_DIR_ENV, str(tmp_path))
    _, run = run_prepare(tmp_path, "killed", path, tokenizer_dir, ray_address=cluster)
    assert os.path.exists(tmp_path / "alpaca-fault-2")  # the worker did die once
    assert cache_digest(run) == cache_digest(one)


def test_a_ray_worker_that_always_dies_fails_in_one_line_and_the_rerun_restarts(tmp_path, alpaca_file, tokenizer_dir,
                                                                                monkeypatch, cluster):
    path, _ = alpaca_file
    _, one = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    monkeypatch.setenv(parallel.FAULT_ENV, "kill:2:always")
    with pytest.raises(StageError, match=r"a Ray worker died 3 times on records \d+-\d+ of .*alpaca.jsonl .*"
                                         r"rerun restarts") as e:
        run_prepare(tmp_path, "run", path, tokenizer_dir, ray_address=cluster)
    assert "\n" not in str(e.value)
    run = open_run(str(tmp_path / "run"))
    assert run.prepare.status == "failed" and not run.is_complete("prepare")
    assert cachemod.problem(run.cache_dir, run.prepare.fingerprint) is not None  # not a complete-looking cache
    assert not os.path.exists(os.path.join(run.cache_dir, "shard_ledger.json"))

    monkeypatch.delenv(parallel.FAULT_ENV)
    result, run = run_prepare(tmp_path, "run", path, tokenizer_dir, ray_address=cluster)
    assert not result.reused and run.is_complete("prepare")
    assert cache_digest(run) == cache_digest(one)


def test_a_bad_record_on_the_cluster_is_the_one_process_error(tmp_path, tokenizer_dir, monkeypatch, cluster):
    records = synthetic_records(60)
    records[45] = {"instruction": "no output"}
    path = write_lines(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as local:
        run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    with pytest.raises(DataError) as on_ray:
        run_prepare(tmp_path, "ray", path, tokenizer_dir, ray_address=cluster)
    assert str(on_ray.value) == str(local.value)
    assert not os.path.exists(tmp_path / "ray" / "data" / "cache")


def test_no_cluster_at_the_address_is_one_line(tmp_path, alpaca_file, tokenizer_dir):
    path, _ = alpaca_file
    with pytest.raises(ConfigError, match=r"--ray-address 127\.0\.0\.1:\d+: no Ray cluster answered") as e:
        run_prepare(tmp_path, "run", path, tokenizer_dir, ray_address=f"127.0.0.1:{free_port()}")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "data" / "cache")


def test_without_the_flag_nothing_imports_ray(tmp_path, alpaca_file, tokenizer_dir):
    path, _ = alpaca_file
    code = ("import sys; from alpaca_cli.config import PrepareConfig; from alpaca_cli.core.prepare import prepare; "
            "from alpaca_cli.rundir import open_run; "
            f"prepare(PrepareConfig(data={path!r}, tokenizer={tokenizer_dir!r}), "
            f"open_run({str(tmp_path / 'run')!r}, create=True)); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_task_that_raises_is_one_line_not_a_traceback(cluster):
    from alpaca_cli.core.ray_engine import RayCluster

    engine = RayCluster(cluster)
    try:
        job = parallel.Job(None, "x.jsonl", "alpaca")  # no config: the task itself raises AttributeError
        chunks = [parallel.Chunk(i, b'{"instruction": "a", "output": "b"}\n', first_line=1 + i) for i in range(3)]
        with pytest.raises(StageError, match=r"^a Ray task failed on the lines from 1 on of x\.jsonl "
                                             r"\(AttributeError: .*rerun restarts the prepare$") as e:
            list(engine.map_ordered(parallel.validate_chunk, job, chunks, "x.jsonl"))
        assert "\n" not in str(e.value)
    finally:
        engine.close()


def test_results_from_the_cluster_own_their_arrays(tmp_path, alpaca_file, tokenizer_dir, cluster):
    """Ray gives a result's arrays as views of the buffer it arrived in (for a large result, its object in Ray's
    object store), and a view keeps that buffer while it lives; the statistics keep every chunk's lengths to the
    end, so the driver's memory grew with the data set. The engine's results own their arrays (checked here on small
    results, which Ray hands over as views too: 3 chunks of 3 records)."""
    from alpaca_cli.core.ray_engine import RayCluster

    path, _ = alpaca_file
    job = parallel.Job(PrepareConfig(data=path, tokenizer=tokenizer_dir), path, "alpaca", "line 1",
                       tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=hash_folder(tokenizer_dir))
    with open(path, "rb") as f:
        lines = f.readlines()[:9]
    chunks = [parallel.Chunk(i, b"".join(lines[3 * i:3 * i + 3]), first_line=1 + 3 * i, first_record=3 * i, records=3)
              for i in range(3)]
    engine = RayCluster(cluster)
    try:
        results = list(engine.map_ordered(parallel.tokenize_chunk, job, chunks, path))
    finally:
        engine.close()
    arrays = [getattr(r, name) for r in results for name in ("ids", "targets", "lengths", "source_index")]
    assert [len(r.lengths) for r in results] == [3, 3, 3]
    assert all(a.flags.owndata for a in arrays)
