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
from alpaca_cli.core.models import BaseModel, open_model_folder
from alpaca_cli.errors import StageError
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)

BASE_FILES = ("config.json", "generation_config.json")


def save_base_files(run: RunDir, base: BaseModel) -> None:
    """Copy the base checkpoint's config files (not its weights) into RUN/base/."""
    if not run.writer:
        return
    if base.is_local:
        for name in BASE_FILES:
            src = os.path.join(base.ref, name)
            if os.path.exists(src):
                with open(src, "rb") as f:
                    io.write_bytes_atomic(io.join(run.base_dir, name), f.read())
    else:
        io.write_text_atomic(io.join(run.base_dir, "config.json"), base.hf_config.to_json_string())
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(base.ref)
            io.write_text_atomic(io.join(run.base_dir, "generation_config.json"), gen.to_json_string())
        except Exception:  # noqa: BLE001 - many checkpoints have none
            pass


@contextlib.contextmanager
def open_run_base(run: RunDir) -> Iterator[BaseModel]:
    """The base model's description as saved in the run (config only)."""
    spec = run.train.inputs.model if run.train is not None else "base"
    if not io.exists(io.join(run.base_dir, "config.json")):
        raise StageError(f"run {run.url} has no base model description (RUN/base/config.json); run `alpaca train` first")
    with io.local_dir(run.base_dir) as local:
        tmp = tempfile.mkdtemp(prefix="alpaca-base-")
        try:
            for name in os.listdir(local):
                shutil.copy(os.path.join(local, name), tmp)
            with open_model_folder(spec, tmp) as bm:
                yield bm
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Checkpoint:
    path: str
    step: int
    """Levanter's step number: the checkpoint directory is step-<step>, saved after step + 1 optimizer updates."""


def checkpoint_step(path: str) -> int:
    """The step a complete checkpoint (one with metadata.json) was saved at."""
    return int(json.loads(io.read_text(io.join(path, "metadata.json")))["step"])


def list_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Complete checkpoints (those with a readable metadata.json: Levanter writes it last, and an asynchronous
    save may be writing it right now), oldest first."""
    out = []
    for name in io.listdir(run.checkpoints_dir):
        path = io.join(run.checkpoints_dir, name)
        try:
            out.append(Checkpoint(path=path, step=checkpoint_step(path)))
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
            continue  # ValueError covers json's JSONDecodeError (an empty or half-written file)
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(run: RunDir) -> str | None:
    """The newest complete checkpoint. Not Levanter's discover_latest_checkpoint: it json-loads every metadata.json
    it sees and crashes on one that an asynchronous save is writing right now."""
    complete = list_checkpoints(run)
    return complete[-1].path if complete else None


def discard_incomplete_checkpoints(run: RunDir) -> list[str]:
    """Delete the checkpoint directories that have no readable metadata.json (a save interrupted by a kill or a
    preemption), on the writer, before training starts. Call on every process: the others wait for it.

    Upstream symptom (levanter 1.2.dev1644): a kill -9 between Levanter opening step-N/metadata.json and closing it
    leaves the file empty on local disk; from then on every resume dies in discover_latest_checkpoint with
    `JSONDecodeError: Expecting value` (the trainer's initial_state and the Checkpointer both call it). Remove this
    when Levanter skips unreadable metadata."""
    from alpaca_cli import distributed

    def discard() -> list[str]:
        complete = {c.path for c in list_checkpoints(run)}
        gone = []
        for name in io.listdir(run.checkpoints_dir):
            path = io.join(run.checkpoints_dir, name)
            if name.startswith("step-") and path not in complete:
                logger.info("Deleting the incomplete checkpoint %s (its save was interrupted)", path)
                io.rm_tree(path)
                gone.append(path)
        return gone

    return distributed.on_writer(discard)  # the others wait for it, and get its error if it fails


def find_checkpoint(run: RunDir, step: int | None = None) -> Checkpoint:
    """The final checkpoint of a finished run, or the one of the given step."""
    if step is None:
        final = run.require_train().final_checkpoint
        if not final or not io.exists(io.join(run.resolve(final), "metadata.json")):
            raise StageError(f"the final checkpoint of run {run.url} is missing; run `alpaca train --run-dir {run.url}`")
        return Checkpoint(path=run.resolve(final), step=checkpoint_step(run.resolve(final)))
    available = list_checkpoints(run)
    for c in available:
        if c.step == step:
            return c
    names = ", ".join(f"step-{c.step}" for c in available) or "none"
    raise StageError(f"no checkpoint step-{step} in {run.checkpoints_dir} (available: {names})")


def load_model(run: RunDir, checkpoint: Checkpoint, *, tokenizer, axis_mapping=None, mesh=None, dtype=None,
               merge: bool = True):
    """The fine-tuned Levanter model from a checkpoint, with the tokenizer's vocabulary (sharding padding removed).

    A LoRA run's checkpoints hold its adapters only: the base weights are read from the run's base model again
    (as training read them), the adapters restored onto them, and (merge) folded into the projections.
    Returns (model, lev_config, hf_config of the base model).
    """
    import equinox as eqx
    import haliax as hax
    import jax
    from levanter.checkpoint import load_checkpoint

    train = run.train
    if train is None or train.plan is None:
        raise StageError(f"run {run.url} has no training plan; run `alpaca train --run-dir {run.url}` first")
    seq_len = train.plan.seq_len
    vocab_trained = train.vocab_trained or len(tokenizer)
    with open_run_base(run) as base:
        lev_config = base.lev_config(seq_len)
        hf_config = base.hf_config
    Vocab = hax.Axis("vocab", vocab_trained)
    try:
        if train.lora is not None:
            model = _load_lora(run, train, lev_config, tokenizer, Vocab, checkpoint, axis_mapping, mesh, merge)
        else:
            shape = eqx.filter_eval_shape(lev_config.build, Vocab, key=jax.random.PRNGKey(0))
            model = load_checkpoint(shape, checkpoint.path, subpath="model", axis_mapping=axis_mapping, mesh=mesh,
                                    discover_latest=False)
    except (KeyError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StageError(
            f"checkpoint {checkpoint.path} does not match the model in {run.base_dir}/config.json "
            f"({type(e).__name__}: {first})",
            hint="the run's base model description and its checkpoints must come from the same `alpaca train`",
        ) from e
    if vocab_trained != len(tokenizer):
        model = hax.named_jit(lambda m: m.resize_vocab(len(tokenizer)), axis_resources=axis_mapping)(model)
    if dtype is not None:
        model = hax.named_jit(
            lambda m: jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, m),
            axis_resources=axis_mapping,
        )(model)
    return model, lev_config, hf_config


def _load_lora(run: RunDir, train, lev_config, tokenizer, Vocab, checkpoint, axis_mapping, mesh, merge: bool):
    import equinox as eqx
    import jax
    import jmp
    from levanter.checkpoint import load_checkpoint
    from levanter.lora import combine_lora_params, partition_lora_params

    from alpaca_cli.core import lora
    from alpaca_cli.core.models import load_base_weights, open_base_model

    added = run.require_prepare().summary.added_tokens
    with open_base_model(train.inputs.model) as base:
        frozen = load_base_weights(base, lev_config, tokenizer, Vocab, axis_mapping, jmp.get_policy("p=f32,c=f32"))
    del added
    model = lora.add_adapters(frozen, train.lora, jax.random.PRNGKey(0))
    base_part, adapters = partition_lora_params(model)
    adapters = load_checkpoint(eqx.filter_eval_shape(lambda: adapters), checkpoint.path, subpath="model",
                               axis_mapping=axis_mapping, mesh=mesh, discover_latest=False)
    model = combine_lora_params(base_part, adapters)
    return lora.merge(model) if merge else model
