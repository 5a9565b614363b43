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
