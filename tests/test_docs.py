"""The documentation stays true: the reference lists every flag as the CLI has it; the README's first two
commands are the quickstart and the test command that CI runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_is_generated_from_the_current_cli():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from gen_reference import OUT, render

    with open(OUT) as f:
        assert f.read() == render(), "docs/reference.md is stale: run python scripts/gen_reference.py"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert "examples/quickstart.sh" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_command = blocks[1].splitlines()[-1]
    assert test_command in ci, f"CI must run the README's test command: {test_command}"


def test_quickstart_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "quickstart.sh")], check=True)
