"""The built-in tiny Llama (`--model demo`): created locally, deterministically, on first use.

Also the helper tests use to make tiny base checkpoints: Levanter config -> random init -> Hugging Face folder.
Writing it needs neither torch nor process 0: the weights go through haliax's state dict and safetensors directly
(Levanter's `save_pretrained` writes weights only on process 0, so a second process of a multi-host run used to
cache a folder without weights).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from alpaca_cli.core.demo_assets import asset

DEMO_VERSION = 1
DEMO_SHAPE = dict(hidden_dim=64, intermediate_dim=192, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=512)
COMPLETE_MARKER = ".alpaca-complete"
"""Written last: a cached folder without it is a half-made one, rebuilt rather than trusted."""


def cache_root() -> str:
    root = os.environ.get("ALPACA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alpaca"
    )
    return root


def demo_model_dir() -> str:
    return os.path.join(cache_root(), f"demo-llama-v{DEMO_VERSION}")


def is_complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in (COMPLETE_MARKER, "config.json", "model.safetensors"))


def ensure_demo_model() -> str:
    """The demo model's folder, created if it is missing or incomplete. One writer per machine (a file lock); the
    folder appears whole (built aside, then renamed into place)."""
    path = demo_model_dir()
    if is_complete(path):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    with _file_lock(os.path.join(cache_root(), ".demo.lock")):
        if is_complete(path):  # another process made it while we waited
            return path
        from levanter.models.llama import LlamaConfig

        tmp = tempfile.mkdtemp(prefix=".demo-", dir=cache_root())
        try:
            write_random_hf_model(tmp, asset("demo_tokenizer"), LlamaConfig(**DEMO_SHAPE), seed=0)
            if os.path.exists(path):  # a broken earlier attempt
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def causal_lm_class_name(model_type: str) -> str:
    """transformers' AutoModelForCausalLM class name for a model_type (from its name table: no torch needed)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def write_random_hf_model(out_dir: str, tokenizer_dir: str, lev_config, *, seed: int = 0) -> str:
    """Randomly initialise a Levanter model and save it as a Hugging Face checkpoint (with its tokenizer)."""
    import haliax as hax
    import jax
    from haliax.state_dict import to_torch_compatible_state_dict
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    from alpaca_cli.core.mesh import local_mesh

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    Vocab = hax.Axis("vocab", len(tok))
    os.makedirs(out_dir, exist_ok=True)
    hf_config = lev_config.to_hf_config(Vocab.size)
    hf_config.architectures = [causal_lm_class_name(hf_config.model_type)]
    hf_config.bos_token_id, hf_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    with hax.partitioning.set_mesh(local_mesh()):
        model = lev_config.build(Vocab, key=jax.random.PRNGKey(seed))
        state_dict = to_torch_compatible_state_dict(model)
    save_file({k: v for k, v in state_dict.items() if v is not None}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    hf_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, COMPLETE_MARKER), "w") as f:
        f.write("complete\n")
    return out_dir
