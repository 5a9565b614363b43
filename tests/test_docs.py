"""The documentation stays true: the reference lists every flag as the CLI has it; the README's first two
commands are the quickstart and the test command that CI runs."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_is_generated_from_the_current_cli():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from gen_reference import OUT, render

    with open(OUT) as f:
        assert f.read() == render(), "docs/reference.md is stale: run python scripts/gen_reference.py"


def test_readme_starts_with_the_two_commands_and_ci_runs_both():
    """CI runs the README's first command as written (a fresh venv, no extras: a missing runtime dependency fails CI,
    not a user), then its test command in a fresh venv of its own."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert "examples/quickstart.sh" in blocks[0] and 'pip install -e . ' in blocks[0] and "[test]" not in blocks[0]
    assert "pytest" in blocks[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    for command in blocks:
        assert command in ci, f"CI must run the README's command as written: {command}"
    assert ci.index(blocks[0]) < ci.index(blocks[1])
