"""The built-in tiny Llama (`--model demo`): created locally, deterministically, on first use.

Also the helper tests use to make tiny base checkpoints: Levanter config -> random init -> Hugging Face folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from alpaca_cli.core.defaults import asset

DEMO_VERSION = 1
DEMO_SHAPE = dict(hidden_dim=64, intermediate_dim=192, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=512)


def cache_root() -> str:
    root = os.environ.get("ALPACA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alpaca"
    )
    return root


def ensure_demo_model() -> str:
    """The demo model's folder, created (atomically) if it does not exist yet."""
    path = os.path.join(cache_root(), f"demo-llama-v{DEMO_VERSION}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from levanter.models.llama import LlamaConfig

    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=cache_root())
    try:
        write_random_hf_model(tmp, asset("demo_tokenizer"), LlamaConfig(**DEMO_SHAPE), seed=0)
        try:
            os.replace(tmp, path)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_random_hf_model(out_dir: str, tokenizer_dir: str, lev_config, *, seed: int = 0) -> str:
    """Randomly initialise a Levanter model and save it as a Hugging Face checkpoint (with its tokenizer)."""
    import dataclasses

    import haliax as hax
    import jax
    from levanter.compat.hf_checkpoints import HFCheckpointConverter
    from transformers import AutoTokenizer

    from alpaca_cli.core.models import local_mesh

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    Vocab = hax.Axis("vocab", len(tok))
    os.makedirs(out_dir, exist_ok=True)
    fields = {f.name for f in dataclasses.fields(lev_config)}
    if "reference_checkpoint" in fields:
        lev_config = dataclasses.replace(lev_config, reference_checkpoint=out_dir)
    # the converter copies a few keys from the reference checkpoint's config.json: write it first
    hf_config = lev_config.to_hf_config(Vocab.size)
    hf_config.save_pretrained(out_dir)
    converter = HFCheckpointConverter(
        type(lev_config), reference_checkpoint=out_dir, HfConfigClass=type(hf_config), tokenizer=tok
    )
    with hax.partitioning.set_mesh(local_mesh()):
        model = lev_config.build(Vocab, key=jax.random.PRNGKey(seed))
        converter.save_pretrained(model, out_dir, save_tokenizer=True)
    # Levanter writes every config default (and begin_suppress_tokens); write the plain Hugging Face config instead
    hf_config.architectures = [converter.HFAutoModelClass().__name__]
    hf_config.bos_token_id, hf_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    os.remove(os.path.join(out_dir, "config.json"))
    hf_config.save_pretrained(out_dir)
    return out_dir
