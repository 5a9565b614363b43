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
import time
from dataclasses import dataclass
from typing import Iterator

from alpaca_cli import io, seal
from alpaca_cli.core.models import BaseModel, open_model_folder
from alpaca_cli.errors import StageError, first_line
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
    problem: str | None = None
    """None when the checkpoint is whole and this run's (its seal checked), else what is wrong with it."""


def checkpoint_step(path: str) -> int:
    """The step a checkpoint (one with metadata.json) was saved at."""
    return int(json.loads(io.read_text(io.join(path, "metadata.json")))["step"])


def identity(run: RunDir, step: int) -> dict:
    """What a checkpoint's seal records it belongs to."""
    return {"run_id": run.run_id, "step": int(step)}


def seal_every_save(checkpointer, run: RunDir, on_sealed=None) -> None:
    """Seal (alpaca_cli/seal.py) every checkpoint `checkpointer` saves once Levanter has committed it: process 0
    writes it in Levanter's commit callback, after every process's arrays and Levanter's metadata.json are in place,
    so a checkpoint is sealed only when it is whole. A failure to seal fails the next save (Levanter re-raises).
    on_sealed() is called after each seal."""
    save = checkpointer.save_checkpoint

    def save_checkpoint(tree, step, destination, commit_callback=None, **kwargs):
        path = io.join(kwargs.get("base_path_override") or checkpointer.base_path, destination)

        def committed():
            seal.write(path, identity(run, int(step)))
            if on_sealed is not None:
                on_sealed()
            if commit_callback is not None:
                commit_callback()

        return save(tree, step, destination, commit_callback=committed, **kwargs)

    checkpointer.save_checkpoint = save_checkpoint


def save_hook(checkpointer):
    """Levanter's checkpointer as a trainer hook: it decides by step and by time whether this step is saved."""

    def on_step(info, force: bool = False):
        checkpointer.on_step(tree=info.state.saveable_state, step=info.step, force=force)

    return on_step


def save_now(checkpointer, info) -> None:
    """Save the state after step `info.step` now, as step-N (asynchronous: wait_until_finished to be sure)."""
    checkpointer.save_checkpoint(tree=info.state.saveable_state, step=info.step, destination=f"step-{info.step}")


def _folders(run: RunDir) -> list[str]:
    """The paths of the run's checkpoint folders (step-N)."""
    return [io.join(run.checkpoints_dir, name) for name in io.listdir(run.checkpoints_dir) if name.startswith("step-")]


def sealed_checkpoints(run: RunDir) -> list[Checkpoint]:
    """This run's sealed checkpoints, oldest first, from their seals alone (cheap: no listing of their files). What
    retention counts and progress reports; `scan_checkpoints` checks the files too."""
    out = []
    for path in _folders(run):
        record = seal.read(path)
        mine = record is not None and (record.get("identity") or {}).get("run_id") == run.run_id
        if mine:
            out.append(Checkpoint(path=path, step=int(record["identity"]["step"])))
    return sorted(out, key=lambda c: c.step)


def scan_checkpoints(run: RunDir) -> list[Checkpoint]:
    """Every checkpoint folder with a readable metadata.json (an asynchronous save may be writing it right now, and
    a kill can leave it empty), oldest first, each with its problem (None: whole and this run's)."""
    out = []
    for path in _folders(run):
        try:
            step = checkpoint_step(path)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
            continue  # ValueError covers json's JSONDecodeError (an empty or half-written file)
        out.append(Checkpoint(path=path, step=step, problem=seal.problem(path, identity(run, step))))
    return sorted(out, key=lambda c: c.step)


def is_whole(run: RunDir, path: str) -> bool:
    """Whether the checkpoint at path is whole and this run's (its files checked against its seal)."""
    if not _has_metadata(path):
        return False
    return seal.problem(path, identity(run, checkpoint_step(path))) is None


def latest_checkpoint(run: RunDir) -> str | None:
    """The newest sealed checkpoint of this run."""
    sealed = sealed_checkpoints(run)
    return sealed[-1].path if sealed else None


def delete_checkpoint(path: str) -> None:
    """Delete a checkpoint so that a deletion cut short (a kill, a preemption) never leaves one that looks whole:
    its seal goes first, Levanter's metadata.json second, the arrays last."""
    seal.remove(path)
    io.rm_file(io.join(path, "metadata.json"))
    io.rm_tree(path)


def resume_point(run: RunDir) -> str | None:
    """The newest whole checkpoint of this run, for training to resume from (None: start from the base model). Call
    on every process: the writer decides, the others get its answer (or its error).

    Before that, on the writer: a folder with neither a readable metadata.json nor a seal (a save cut short by a kill)
    is deleted: nothing in it is whole, and Levanter's discovery trips over it (levanter 1.2.dev1644 died with
    `JSONDecodeError` on an empty metadata.json; marin-levanter 0.2.20 logs a traceback and skips it); a checkpoint that is not whole or
    not this run's is moved aside to RUN/checkpoints-unusable/ with a warning, so neither Levanter nor retention ever
    takes it for the run's own, and nothing is lost. With no whole checkpoint but unusable ones, nothing is moved and
    the resume is refused: training from the base model again is the user's decision."""
    from alpaca_cli import distributed

    def decide() -> str | None:
        found = scan_checkpoints(run)
        unusable = [(c.path, c.problem) for c in found if c.problem is not None]
        for path in _folders(run):
            if _has_metadata(path):
                continue
            if seal.read(path) is None:
                logger.info("Deleting the incomplete checkpoint %s (its save was interrupted)", path)
                io.rm_tree(path)
            else:
                unusable.append((path, "has no readable metadata.json"))
        whole = [c for c in found if c.problem is None]
        if unusable and not whole:
            path, why = unusable[-1]
            raise StageError(f"no whole checkpoint of run {run.url} to resume from: {path} {why}",
                             hint=f"restore it from a copy, or move it out of {run.checkpoints_dir} to train again "
                                  "from the base model")
        for path, why in unusable:
            aside = io.join(run.unusable_checkpoints_dir, f"{os.path.basename(path)}-{int(time.time())}")
            logger.warning("Checkpoint %s %s: moved aside to %s; resuming from %s", path, why, aside, whole[-1].path)
            io.move(path, aside)
        return whole[-1].path if whole else None

    return distributed.on_writer(decide)


def _has_metadata(path: str) -> bool:
    try:
        checkpoint_step(path)
        return True
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
        return False


def find_checkpoint(run: RunDir, step: int | None = None) -> Checkpoint:
    """The final checkpoint of a finished run, or the one of the given step; refused unless whole and the run's own."""
    found = scan_checkpoints(run)
    whole = [f"step-{c.step}" for c in found if c.problem is None]
    pick = (f"or pick a whole one with --step (whole: {', '.join(whole)})" if whole else
            "(no other checkpoint of this run is whole)")
    if step is None:
        final = run.require_train().final_checkpoint
        path = run.resolve(final) if final else None
        match = [c for c in found if c.path == path]
        if not match:
            raise StageError(f"the final checkpoint of run {run.url} ({path or 'none recorded'}) is missing",
                             hint=f"restore it from a copy {pick}")
    else:
        match = [c for c in found if c.step == step]
        if not match:
            raise StageError(f"no checkpoint step-{step} in {run.checkpoints_dir} (whole: {', '.join(whole) or 'none'})")
    c = match[-1]
    if c.problem is not None:
        raise StageError(f"checkpoint {c.path} {c.problem}", hint=f"restore it from a copy {pick}")
    return c


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
            model = load_checkpoint(shape, checkpoint.path, subpath="model", axis_mapping=axis_mapping, mesh=mesh)
    except (KeyError, ValueError, TypeError) as e:
        raise StageError(
            f"checkpoint {checkpoint.path} does not match the model in {run.base_dir}/config.json "
            f"({type(e).__name__}: {first_line(e, 200) or type(e).__name__})",
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
    from levanter.adaptor.lora import combine_lora_params, partition_lora_params

    from alpaca_cli.core import lora
    from alpaca_cli.core.models import load_base_weights, open_base_model

    with open_base_model(train.inputs.model) as base:
        frozen = load_base_weights(base, lev_config, tokenizer, Vocab, axis_mapping, jmp.get_policy("p=f32,c=f32"))
    model = lora.add_adapters(frozen, train.lora, jax.random.PRNGKey(0))
    base_part, adapters = partition_lora_params(model)
    adapters = load_checkpoint(eqx.filter_eval_shape(lambda: adapters), checkpoint.path, subpath="model",
                               axis_mapping=axis_mapping, mesh=mesh)
    model = combine_lora_params(base_part, adapters)
    return lora.merge(model) if merge else model
