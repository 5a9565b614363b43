"""Trained checkpoints: finding them, and loading the fine-tuned model from one, with no Hub access.

`alpaca train` copies the base model's config files into RUN/base/, so export and generate rebuild the exact model
shape from the run directory alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

from alpaca_cli import io
from alpaca_cli.core.models import BaseModel, _open_ref
from alpaca_cli.errors import StageError
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)

BASE_FILES = ("config.json", "generation_config.json")


def base_dir(run: RunDir) -> str:
    return run.path("base")


def save_base_files(run: RunDir, base: BaseModel) -> None:
    """Copy the base checkpoint's config files (not its weights) into RUN/base/."""
    if not run.writer:
        return
    if base.is_local:
        for name in BASE_FILES:
            src = os.path.join(base.ref, name)
            if os.path.exists(src):
                with open(src, "rb") as f:
                    io.write_bytes_atomic(io.join(base_dir(run), name), f.read())
    else:
        io.write_text_atomic(io.join(base_dir(run), "config.json"), base.hf_config.to_json_string())
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(base.ref)
            io.write_text_atomic(io.join(base_dir(run), "generation_config.json"), gen.to_json_string())
        except Exception:  # noqa: BLE001 - many checkpoints have none
            pass


@contextlib.contextmanager
def open_run_base(run: RunDir) -> Iterator[BaseModel]:
    """The base model's description as saved in the run (config only)."""
    spec = ((run.stage("train") or {}).get("inputs") or {}).get("model", "base")
    if not io.exists(io.join(base_dir(run), "config.json")):
        raise StageError(f"run {run.url} has no base model description (RUN/base/config.json); run `alpaca train` first")
    with io.local_dir(base_dir(run)) as local:
        tmp = tempfile.mkdtemp(prefix="alpaca-base-")
        try:
            for name in os.listdir(local):
                shutil.copy(os.path.join(local, name), tmp)
            with _open_ref(spec, tmp) as bm:
                yield bm
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Checkpoint:
    path: str
    step: int
    """Levanter's step number: the checkpoint directory is step-<step>, saved after step + 1 optimizer updates."""


def list_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Complete checkpoints (those with metadata.json), oldest first."""
    out = []
    for name in io.listdir(run.checkpoints_dir):
        path = io.join(run.checkpoints_dir, name)
        meta = io.join(path, "metadata.json")
        if io.exists(meta):
            out.append(Checkpoint(path=path, step=int(json.loads(io.read_text(meta))["step"])))
    return sorted(out, key=lambda c: c.step)


def find_checkpoint(run: RunDir, step: int | None = None) -> Checkpoint:
    """The final checkpoint of a finished run, or the one of the given step."""
    if step is None:
        st = run.require("train")
        final = (st.get("outputs") or {}).get("final_checkpoint")
        if not final or not io.exists(io.join(run.resolve(final), "metadata.json")):
            raise StageError(f"the final checkpoint of run {run.url} is missing; run `alpaca train --run-dir {run.url}`")
        meta = json.loads(io.read_text(io.join(run.resolve(final), "metadata.json")))
        return Checkpoint(path=run.resolve(final), step=int(meta["step"]))
    available = list_checkpoints(run)
    for c in available:
        if c.step == step:
            return c
    names = ", ".join(f"step-{c.step}" for c in available) or "none"
    raise StageError(f"no checkpoint step-{step} in {run.checkpoints_dir} (available: {names})")


def load_model(run: RunDir, checkpoint: Checkpoint, *, tokenizer, axis_mapping=None, mesh=None, dtype=None):
    """The fine-tuned Levanter model from a checkpoint, with the tokenizer's vocabulary (sharding padding removed).

    Returns (model, lev_config, hf_config of the base model).
    """
    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from levanter.checkpoint import load_checkpoint

    st = run.stage("train") or {}
    seq_len = int((st.get("config") or {}).get("seq_len") or 2048)
    vocab_trained = int(st.get("vocab_trained") or len(tokenizer))
    with open_run_base(run) as base:
        lev_config = base.lev_config(seq_len)
        hf_config = base.hf_config
    Vocab = hax.Axis("vocab", vocab_trained)
    shape = eqx.filter_eval_shape(lev_config.build, Vocab, key=jax.random.PRNGKey(0))
    model = load_checkpoint(shape, checkpoint.path, subpath="model", axis_mapping=axis_mapping, mesh=mesh,
                            discover_latest=False)
    if vocab_trained != len(tokenizer):
        model = hax.named_jit(lambda m: m.resize_vocab(len(tokenizer)), axis_resources=axis_mapping)(model)
    if dtype is not None:
        model = hax.named_jit(
            lambda m: jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, m),
            axis_resources=axis_mapping,
        )(model)
    return model, lev_config, hf_config
