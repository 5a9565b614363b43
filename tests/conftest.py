"""Shared fixtures: everything offline, everything under tmp_path.

- JAX on CPU with 4 fake devices, so sharded meshes run here; one persistent compilation cache for the session, so
  the many `alpaca` subprocesses that compile the same tiny programs compile each once.
- Two workers (pytest-xdist, `-n 2`): a test marked `exclusive` (timing-sensitive: processes that must join within
  gloo's fixed 30 s, a signal at a chosen moment) runs while no other test runs (see pytest_runtest_protocol).
- The demo tokenizer shipped with the package (a Llama-2-style SentencePiece BPE) and tiny Llama checkpoints built
  from a Levanter config with random weights.
- GCS through a real emulator (fake-gcs-server), one per session.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

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
# The run's scratch folder (the compilation cache, the workers' lock), made by the process that starts the run; the
# xdist workers and every subprocess inherit it.
_OWNS_RUN = "ALPACA_TESTS_RUN" not in os.environ
if _OWNS_RUN:
    os.environ["ALPACA_TESTS_RUN"] = tempfile.mkdtemp(prefix="alpaca-tests-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["ALPACA_TESTS_RUN"], "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# jaxlib 0.10.0 logs two C++ errors for every executable it loads from that cache ("cpu_aot_loader.cc:195 ... Target
# machine feature +prefer-no-gather is not supported on the host machine"), although this very host compiled it;
# the tests' subprocesses would print thousands. Only the cache does it, and only the tests turn the cache on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from helpers import ASSETS, DEMO_TOKENIZER, cli_env, write_jsonl  # noqa: E402,F401


def _is_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_unconfigure(config):
    if _OWNS_RUN:
        shutil.rmtree(os.environ.pop("ALPACA_TESTS_RUN"), ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A readers-writer lock across the xdist workers, held for a test's setup, call and teardown: an `exclusive`
    test takes it alone, every other test shared. A turnstile keeps a waiting exclusive test from being overtaken
    by the other worker's next tests."""
    if not _is_worker():
        yield
        return
    import fcntl

    base = os.path.join(os.environ["ALPACA_TESTS_RUN"], "exclusive")
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(base + ".turnstile", "a") as gate, open(base + ".lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
def chatml_tokenizer_dir(tmp_path_factory, tokenizer_dir) -> str:
    """The demo (Llama-style) tokenizer with ChatML's markers as special tokens, as a ChatML model carries them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    path = str(tmp_path_factory.mktemp("chatml-tok"))
    tok.save_pretrained(path)
    return path


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


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory, tokenizer_dir):
    """A tiny Llama (context 256) trained with rows of 128 tokens until it memorised six awkward examples (braces,
    quotes, unicode, an input), checkpoints at steps 40 and 79 kept: (run, base model folder, records)."""
    from helpers import make_tiny_llama, read_records, run_cli

    root = tmp_path_factory.mktemp("trained")
    records = read_records(os.path.join(ASSETS, "alpaca_awkward.jsonl"))[:6]
    data = write_jsonl(str(root / "few.jsonl"), records)
    model_dir = make_tiny_llama(str(root / "base"), tokenizer_dir, hidden_dim=64, intermediate_dim=128)
    run = str(root / "run")
    run_cli(["prepare", "--data", data, "--tokenizer", tokenizer_dir, "--run-dir", run, "--max-length", "128", "-q"])
    run_cli(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "128", "--batch-size", "6", "--steps", "80",
             "--learning-rate", "1e-2", "--warmup", "0.05", "--precision", "p=f32,c=f32", "--checkpoint-every", "40",
             "--keep-checkpoints", "2", "-q"])
    return run, model_dir, records


@pytest.fixture
def trained(trained_template, tmp_path):
    """A copy of the trained run, the test's own: (run, base model folder, records)."""
    import shutil

    run, model_dir, records = trained_template
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return dst, model_dir, records
