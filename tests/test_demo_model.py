"""The built-in demo model's cache (`--model demo`): made by one writer, complete, and a half-made one is rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import cli_env

from alpaca_cli.core.demo_model import DEMO_SHAPE, DEMO_VERSION

MAKE = "from alpaca_cli.core.demo_model import ensure_demo_model; print(ensure_demo_model())"


def test_a_half_made_folder_is_rebuilt_by_one_of_two_racing_processes(tmp_path):
    from safetensors.numpy import load_file

    cache = tmp_path / "cache"
    folder = cache / f"demo-llama-v{DEMO_VERSION}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what a crashed attempt left: no weights, no completion marker
    env = cli_env(ALPACA_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", MAKE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == outs[1][0].strip() == str(folder)

    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (DEMO_SHAPE["hidden_dim"], DEMO_SHAPE["num_layers"])
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert sorted(n for n in os.listdir(cache) if n.startswith(".demo-")) == []  # nothing built aside is left
