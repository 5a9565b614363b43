"""--data as a Hub dataset id, against the local Hub server: pinned to the commit it resolved to."""

import subprocess
import sys

import pytest

from fake_hub import FakeHub
from helpers import cli_env, error_line, run_cli

from alpaca_cli.rundir import open_run

UPLOAD = r"""
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("tester/mini-alpaca", repo_type="dataset", exist_ok=True)
api.upload_file(path_or_fileobj=sys.argv[1], path_in_repo="data/train.jsonl", repo_id="tester/mini-alpaca",
                repo_type="dataset")
"""

pytestmark = pytest.mark.entry


def test_prepare_from_a_hub_dataset_records_its_revision(tmp_path, fixture_data):
    hub = FakeHub.start()
    try:
        env = cli_env(**hub.env(), HF_DATASETS_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
        subprocess.run([sys.executable, "-c", UPLOAD, fixture_data], env=env, check=True, capture_output=True)
        run = str(tmp_path / "run")
        out = run_cli(["prepare", "--data", "tester/mini-alpaca", "--tokenizer", "demo", "--run-dir", run], env=env)
        assert "records read" in out.stdout
        data = open_run(run).prepare.inputs.data
        commit = hub.commits("tester/mini-alpaca", "main", repo_type="dataset")[0]
        assert (data.kind, data.id, data.revision) == ("hub", "tester/mini-alpaca", commit["oid"])

        # a new commit on the dataset is new data: the old cache is not reused silently
        short = tmp_path / "short.jsonl"
        short.write_text("".join(open(fixture_data).readlines()[:3]))
        subprocess.run([sys.executable, "-c", UPLOAD, str(short)], env=env, check=True, capture_output=True)
        stale = run_cli(["prepare", "--data", "tester/mini-alpaca", "--tokenizer", "demo", "--run-dir", run],
                        env=env, check=False)
        assert stale.returncode == 1 and "differs in data" in error_line(stale)
    finally:
        hub.stop()


CHUNKED = r"""
import json, sys
from alpaca_cli.core import parallel
from alpaca_cli.config import PrepareConfig
from alpaca_cli.core.data import load_records
from alpaca_cli.core.prepare import prepare
from alpaca_cli.errors import DataError
from alpaca_cli.rundir import open_run

data, tokenizer, run, workers = sys.argv[1:5]
parallel.CHUNK_RECORDS = 3  # many chunks of a small dataset, read from its Arrow files one at a time
cfg = PrepareConfig(data=data, tokenizer=tokenizer, workers=int(workers))
out = {}
try:
    load_records(cfg)  # the whole dataset read at once, as held-out data is
except DataError as e:
    out["whole"] = str(e)
try:
    out["examples"] = prepare(cfg, open_run(run, create=True)).stats["examples"]
except DataError as e:
    out["chunked"] = str(e)
print(json.dumps(out))
"""


def test_a_hub_dataset_is_read_in_chunks_on_the_workers_into_the_local_files_cache(tmp_path, fixture_data,
                                                                                    tokenizer_dir):
    """A Hub dataset is not read whole: its rows go to the workers in chunks, and the cache holds the arrays the same
    records give from a local file; a bad record in a later chunk is the error reading it whole gives."""
    import json

    from test_prepare_parallel import cache_digest

    from alpaca_cli.config import PrepareConfig
    from alpaca_cli.core.prepare import prepare

    records = [json.loads(x) for x in open(fixture_data) if x.strip()]
    local = open_run(str(tmp_path / "local"), create=True)
    kept = prepare(PrepareConfig(data=fixture_data, tokenizer=tokenizer_dir, workers=0), local).stats["examples"]
    hub = FakeHub.start()
    try:
        env = cli_env(**hub.env(), HF_DATASETS_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
        subprocess.run([sys.executable, "-c", UPLOAD, fixture_data], env=env, check=True, capture_output=True)
        run = str(tmp_path / "hub")
        out = subprocess.run([sys.executable, "-c", CHUNKED, "tester/mini-alpaca", tokenizer_dir, run, "2"], env=env,
                             check=True, capture_output=True, text=True)
        assert json.loads(out.stdout.splitlines()[-1]) == {"examples": kept}
        assert len(records) > 3 * 3  # several chunks, so the workers were used
        assert cache_digest(open_run(run), arrays_only=True) == cache_digest(local, arrays_only=True)

        bad = tmp_path / "bad.jsonl"
        records[len(records) - 2] = {"instruction": "no output here"}
        bad.write_text("".join(json.dumps(r) + "\n" for r in records))
        subprocess.run([sys.executable, "-c", UPLOAD, str(bad)], env=env, check=True, capture_output=True)
        out = subprocess.run([sys.executable, "-c", CHUNKED, "tester/mini-alpaca", tokenizer_dir,
                              str(tmp_path / "bad-run"), "2"], env=env, check=True, capture_output=True, text=True)
        errors = json.loads(out.stdout.splitlines()[-1])
        assert errors["chunked"] == errors["whole"] and f"row {len(records) - 2}" in errors["chunked"]
        assert not (tmp_path / "bad-run" / "data" / "cache").exists()
    finally:
        hub.stop()
