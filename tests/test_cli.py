"""The command line: instant help, one error boundary, exit codes, and the prepare/inspect/status wiring."""

import json
import subprocess
import sys

from helpers import cli_env, error_line, read_records, run_cli, table_rows
from typer.testing import CliRunner

from alpaca_cli import __version__
from alpaca_cli.errors import RunDirError
from alpaca_cli.main import app
from alpaca_cli.rundir import open_run

runner = CliRunner()


def test_help_lists_every_command_and_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from alpaca_cli.main import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "for cmd in ['prepare', 'train', 'export', 'generate', 'eval', 'inspect', 'status']:\n"
        "    try:\n"
        "        app([cmd, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('jax', 'levanter', 'torch', 'transformers', 'haliax', 'datasets') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout
    for cmd in ("prepare", "train", "export", "generate", "eval", "inspect", "status"):
        assert cmd in out.stdout
    assert out.stdout.count("Examples:") >= 7  # every command's help shows real invocations


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"alpaca {__version__}"


def test_usage_error_exits_2():
    result = runner.invoke(app, ["prepare", "--max-length", "lots"])
    assert result.exit_code == 2


def test_handled_error_is_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["status", "--run-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and isinstance(result.exception, RunDirError)
    proc = run_cli(["status", "--run-dir", str(tmp_path / "none")], check=False, timeout=60)
    assert proc.returncode == 1
    assert error_line(proc) == f"Error: no run at {tmp_path / 'none'}; run `alpaca prepare --run-dir {tmp_path / 'none'}` first"
    assert "ALPACA_DEBUG" in proc.stderr
    debug = run_cli(["status", "--run-dir", str(tmp_path / "none")], check=False, env=cli_env(ALPACA_DEBUG=1), timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_prepare_inspect_status_through_the_cli(tmp_path, fixture_data, tokenizer_dir):
    from stanford_reference import preprocess
    from stanford_reference import stanford_tokenizer

    run = str(tmp_path / "run")
    out = run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", run, "--max-length", "128"])
    table = table_rows(out.stdout)
    assert table["records read"] == str(len(read_records(fixture_data)))
    assert table["examples kept"] == str(open_run(run).prepare.summary.examples)
    again = run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", run, "--max-length", "128"])
    assert "reused" in again.stdout
    stale = run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", run], check=False)
    assert stale.returncode == 1 and "--overwrite" in error_line(stale)

    js = run_cli(["inspect", "--run-dir", run, "--json"])
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    records = read_records(fixture_data)
    ids, labels = preprocess(records, stanford_tokenizer(tokenizer_dir), model_max_length=128)
    expected = [i for i in range(len(records)) if any(x != -100 for x in labels[i][1:])]
    assert [r["index"] for r in rows] == expected
    for r in rows:
        assert r["input_ids"] == ids[r["index"]] and r["labels"] == labels[r["index"]]

    one = run_cli(["inspect", "--run-dir", run, "--json", "--index", "5", "--count", "2"])
    assert [json.loads(line)["index"] for line in one.stdout.splitlines()] == [5, 6]
    shown = run_cli(["inspect", "--run-dir", run, "--index", "2", "--count", "1"])
    assert "record 2:" in shown.stdout and "Ünïcødé" in shown.stdout

    status = run_cli(["status", "--run-dir", run])
    assert "prepare" in status.stdout and "complete" in status.stdout
    manifest = json.loads(run_cli(["status", "--run-dir", run, "--json"]).stdout)
    assert manifest["stages"]["prepare"]["status"] == "complete"


def test_bad_flag_values_are_clear(tmp_path, fixture_data, tokenizer_dir):
    proc = run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", str(tmp_path / "r"),
                    "--on-overflow", "chop"], check=False)
    assert proc.returncode == 1
    assert error_line(proc) == "Error: on_overflow (--on-overflow) must be one of truncate, drop, error, got 'chop'"
    assert not (tmp_path / "r").exists()
