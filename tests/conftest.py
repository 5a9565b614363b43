"""Shared fixtures: everything offline, everything under tmp_path.

- JAX on CPU with 4 fake devices, so sharded meshes run here.
- The demo tokenizer shipped with the package (a Llama-2-style SentencePiece BPE) and tiny Llama checkpoints built
  from a Levanter config with random weights.
- GCS through a real emulator (fake-gcs-server), one per session.
"""

from __future__ import annotations

import json
import os
import sys

# Before JAX, fsspec or huggingface_hub are imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "disabled"
os.environ["FSSPEC_GCS_TOKEN"] = "anon"
for _var in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
    os.environ[_var] = "127.0.0.1:1"  # no credential probe leaves the machine

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ASSETS, DEMO_TOKENIZER, cli_env, write_jsonl  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """The demo model cache (ALPACA_CACHE_DIR) lives under the session's tmp dir."""
    path = tmp_path_factory.mktemp("alpaca-cache")
    os.environ["ALPACA_CACHE_DIR"] = str(path)
    yield str(path)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return DEMO_TOKENIZER


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A 2-layer Llama (hidden 32, GQA 4 heads / 2 kv heads) with random weights, saved as a Hugging Face folder."""
    from helpers import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")), tokenizer_dir)


@pytest.fixture(scope="session")
def fixture_data() -> str:
    """Alpaca records with the awkward cases (unicode, braces, blank input, quotes, newlines, long, empty)."""
    return os.path.join(ASSETS, "alpaca_awkward.jsonl")


@pytest.fixture(scope="session")
def gcs():
    """A fake-gcs-server for the session; yields the bucket URL (gs://alpaca-test)."""
    from helpers import FakeGCS

    server = FakeGCS.start()
    try:
        yield server
    finally:
        server.stop()
