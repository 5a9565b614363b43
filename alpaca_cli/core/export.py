"""`alpaca export`: a trained checkpoint -> a Hugging Face checkpoint (safetensors, config, tokenizer, generation
config, model card), optionally verified against Levanter and uploaded to the Hub.

Levanter's converter writes the weights shard by shard (one shard on the host at a time) but its config.json is
built from Levanter's model config: the training seq_len becomes max_position_embeddings, every default is
written, and `begin_suppress_tokens` stops generation from ever starting with EOS. The config written here is the
base model's own config.json with only the vocabulary size, dtype and special-token ids changed.

The merged model and a LoRA adapter (--adapter) take one path and differ only in the weights they write
(`_write_merged`, `_write_adapter`). The rest lives beside this module: export_folder.py (where an export may go, how
a finished one is put in place), export_verify.py (--verify), model_card.py (README.md), hub.py (--push-to-hub).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

from alpaca_cli import distributed, io
from alpaca_cli.config import EXPORT_DTYPES, ExportConfig
from alpaca_cli.core import export_verify
from alpaca_cli.core.checkpoints import Checkpoint, find_checkpoint, load_model, open_run_base
from alpaca_cli.core.export_folder import check_output, check_writable, seal
from alpaca_cli.core.hub import push, resolve_token
from alpaca_cli.core.mesh import FSDP, local_mesh
from alpaca_cli.core.model_card import write_model_card
from alpaca_cli.core.prompts import PROMPTS_FILE
from alpaca_cli.core.served_template import run_chat_template
from alpaca_cli.errors import AlpacaError, ConfigError
from alpaca_cli.records import ExportOutputs, ExportRecord, ExportSummary
from alpaca_cli.rundir import RunDir

@dataclass
class _Job:
    """An export, resolved and checked before any work: what is written, where, and the token for the Hub."""

    cfg: ExportConfig
    run: RunDir
    checkpoint: Checkpoint
    export_dir: str
    dtype: str
    max_shard: int
    token: Optional[str]


@dataclass
class _Weights:
    """What the merged model and the LoRA adapter differ in, once their weights are written."""

    dtype: str
    reference: Callable[[], Any]
    """The Levanter model the export must compute (for --verify)."""
    load: Callable[[str], Any]
    """The written folder as transformers (and PEFT, for an adapter) loads it (for --verify)."""
    logits: str
    """Whose logits --verify compares with Levanter's, and what was not written when they differ (its messages)."""
    noun: str
    adapter_base: Optional[str] = None
    """What an adapter names as its base model (None for the merged model)."""


def export(cfg: ExportConfig, run: RunDir) -> Optional[ExportRecord]:
    """Write the checkpoint as a Hugging Face folder (and verify, and push): the stage's record. On a pod the writer
    (process 0) exports with its own devices while the other processes wait for its outcome: they get None."""
    job = _resolve(cfg, run)

    def work() -> ExportRecord:
        check_output(job.export_dir, run, cfg.overwrite)
        record = ExportRecord(config=cfg, checkpoint=run.relative(job.checkpoint.path), step=job.checkpoint.step)
        with run.stage("export", record):
            record.outputs, record.summary = _export_here(job)
        return record

    return distributed.on_writer(work, encode=lambda r: None, decode=lambda _: None)


def _resolve(cfg: ExportConfig, run: RunDir) -> _Job:
    """Everything an export can be refused for, before any work."""
    token = resolve_token(cfg)
    if cfg.verify:
        export_verify.require_torch()
    dtype = _resolve_dtype(cfg, run)
    checkpoint = find_checkpoint(run, cfg.step)
    export_dir = io.normalize(cfg.output) if cfg.output else run.export_dir
    check_writable(export_dir)
    import humanfriendly

    try:
        max_shard = humanfriendly.parse_size(cfg.max_shard_size)
    except humanfriendly.InvalidSize:
        raise ConfigError(f"--max-shard-size {cfg.max_shard_size!r} is not a size like 5GB") from None
    return _Job(cfg, run, checkpoint, export_dir, dtype, max_shard, token)


def _resolve_dtype(cfg: ExportConfig, run: RunDir) -> str:
    """--dtype, else the base checkpoint's own (`torch_dtype`, or `dtype` as newer transformers write it)."""
    if cfg.dtype:
        return cfg.dtype
    try:
        base_cfg = json.loads(io.read_text(io.join(run.base_dir, "config.json")))
    except FileNotFoundError:
        base_cfg = {}
    name = base_cfg.get("torch_dtype") or base_cfg.get("dtype") or "float32"
    name = str(name).replace("torch.", "")
    return name if name in EXPORT_DTYPES else "float32"


def _export_here(job: _Job) -> tuple[ExportOutputs, ExportSummary]:
    """The weights (merged or adapter) and what every export has besides, checked, put in place, pushed."""
    import haliax as hax

    run, cfg = job.run, job.cfg
    prep = run.require_prepare()
    tok = run.load_tokenizer()
    # the template the run trained with, saved with the tokenizer (chat_template.jinja, as transformers 4.57 saves it)
    tok.chat_template = run_chat_template(prep, tok)
    # this process's devices only (other hosts of a pod wait for the outcome), FSDP: no device holds the whole model
    mesh = local_mesh(all_devices=True)
    staging = tempfile.mkdtemp(prefix="alpaca-export-")
    try:
        with hax.partitioning.set_mesh(mesh), hax.axis_mapping(FSDP):
            weights = (_write_adapter if cfg.adapter else _write_merged)(job, staging, tok, mesh)
            if prep.chat_template is None:  # Alpaca records: generate --from-export formats requests as trained
                with open(os.path.join(staging, PROMPTS_FILE), "w") as f:
                    json.dump(dataclasses.asdict(prep.config.prompts), f, indent=2)
            summary = ExportSummary(weight_bytes=_weight_bytes(staging),
                                    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            if cfg.verify:
                _verify(job, weights, staging, tok, summary)
            write_model_card(run, staging, step=job.checkpoint.step, dtype=weights.dtype, summary=summary,
                             adapter_base=weights.adapter_base)
        files = seal(run, job.checkpoint.step, staging, job.export_dir)
        outputs = ExportOutputs(export_dir=run.relative(job.export_dir), dtype=weights.dtype,
                                step=job.checkpoint.step, files=files)
        if cfg.push_to_hub:
            source = job.export_dir if not io.is_remote(job.export_dir) else staging  # the same files, on this host
            outputs.repo_id, outputs.repo_url, outputs.commit = push(source, run, cfg, job.token, job.export_dir)
            outputs.revision = cfg.revision or "main"
        return outputs, summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_merged(job: _Job, staging: str, tok, mesh) -> _Weights:
    """The model with every weight: Levanter's converter writes the weights (shard by shard) and the tokenizer; the
    configs are the base model's own (the module's docstring says why)."""
    import jax.numpy as jnp

    model, _, _ = load_model(job.run, job.checkpoint, tokenizer=tok, axis_mapping=FSDP, mesh=mesh)
    with open_run_base(job.run) as base, _writer_alone_in_save_state_dict():
        base.converter(tok).save_pretrained(
            model, staging, save_tokenizer=True, max_shard_size=job.max_shard, dtype=jnp.dtype(job.dtype),
            save_reference_code=False,
        )
    _write_configs(job.run, staging, tok, job.dtype)
    return _Weights(dtype=job.dtype, reference=lambda: model,
                    load=lambda folder: export_verify.load_model(folder, job.dtype),
                    logits="the export's logits", noun="export")


def _write_adapter(job: _Job, staging: str, tok, mesh) -> _Weights:
    """A LoRA run's adapters in PEFT's format (float32), with the prepared tokenizer (its [PAD])."""
    from alpaca_cli.core import lora

    train = job.run.require_train()
    if train.lora is None:
        raise ConfigError(f"--adapter: run {job.run.url} trained every weight, so it has no adapter",
                          hint="export the model itself (without --adapter)")
    model, _, _ = load_model(job.run, job.checkpoint, tokenizer=tok, axis_mapping=FSDP, mesh=mesh, merge=False)
    base = _base_reference(train.inputs.model)
    lora.save_adapter(model, train.lora, base, staging)
    tok.save_pretrained(staging)
    return _Weights(dtype="float32", reference=lambda: lora.merge(model),
                    load=lambda folder: export_verify.load_adapter(folder, train.inputs.model, tok),
                    logits="PEFT's logits with the adapter", noun="adapter", adapter_base=base)


def _verify(job: _Job, weights: _Weights, staging: str, tok, summary: ExportSummary) -> None:
    """--verify: the written folder computes what Levanter computes, or the export stops before it is put in place."""
    export_verify.compare(summary, weights.load(staging), weights.reference(), job.run, tok, weights.dtype, job.cfg)
    if not summary.verify_max_abs_diff <= summary.verify_tolerance:  # a NaN difference fails too
        raise AlpacaError(
            f"--verify: {weights.logits} differ from Levanter's by {summary.verify_max_abs_diff:.3g} "
            f"(tolerance {summary.verify_tolerance:g}); the {weights.noun} at {job.export_dir} was not written"
        )


def _weight_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _base_reference(spec: str) -> str:
    """What an adapter names as its base: the Hub id, or the folder (absolute), or the demo model's cache folder."""
    from alpaca_cli.core.models import DEMO_MODEL

    if spec == DEMO_MODEL:
        from alpaca_cli.core.demo_model import demo_model_dir

        return demo_model_dir()
    return os.path.abspath(os.path.expanduser(spec)) if os.path.exists(os.path.expanduser(spec)) else spec


def refresh_model_card(run: RunDir) -> None:
    """Rewrite the export's model card (after `alpaca eval`, whose scores the merged model's card lists; an
    adapter's card lists none)."""
    record = run.export
    if record.config.adapter:
        return
    tmp = tempfile.mkdtemp(prefix="alpaca-card-")
    try:
        write_model_card(run, tmp, step=record.step, dtype=record.outputs.dtype, summary=record.summary)
        with open(os.path.join(tmp, "README.md"), "rb") as f:
            io.write_bytes_atomic(io.join(run.resolve(record.outputs.export_dir), "README.md"), f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_configs(run: RunDir, folder: str, tok, dtype_name: str) -> None:
    """config.json and generation_config.json: the base model's own, with the prepared tokenizer's vocabulary and
    special tokens and the export's dtype."""
    base_cfg = json.loads(io.read_text(io.join(run.base_dir, "config.json")))
    cfg = dict(base_cfg)
    cfg["vocab_size"] = len(tok)
    cfg.pop("begin_suppress_tokens", None)
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = dtype_name
    else:
        cfg["torch_dtype"] = dtype_name
    for name in ("bos", "eos", "pad"):
        value = getattr(tok, f"{name}_token_id")
        if value is not None:
            cfg[f"{name}_token_id"] = value
    import transformers

    cfg["transformers_version"] = transformers.__version__
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)

    gen_path = io.join(run.base_dir, "generation_config.json")
    gen = json.loads(io.read_text(gen_path)) if io.exists(gen_path) else {}
    gen.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = {k: v for k, v in gen.items() if v is not None}
    gen["transformers_version"] = transformers.__version__
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def _writer_alone_in_save_state_dict():
    """Workaround for haliax 1.4.dev453, still so in marin-haliax 0.2.20 (state_dict.py:420):
    `haliax._src.state_dict.save_state_dict` (which Levanter's `save_pretrained` calls for every safetensors shard)
    ends with `sync_global_devices`, a collective over every process of the pod. Our export runs on the writer's own
    devices while the other hosts wait for its outcome (`distributed.on_writer`), so that barrier can never complete:
    a hang on a TPU or GPU pod, and on CPU processes "Gloo context initialization failed: DEADLINE_EXCEEDED" after
    30 s. Inside this block the barrier is skipped. Tested by
    test_multihost.py::test_two_processes_equal_one_process_with_four_devices (the export on two hosts)."""
    hax_state_dict = _haliax_state_dict_module()
    if distributed.process_count() <= 1:
        yield
        return
    barrier = hax_state_dict.sync_global_devices
    hax_state_dict.sync_global_devices = lambda name: None
    try:
        yield
    finally:
        hax_state_dict.sync_global_devices = barrier


def _haliax_state_dict_module():
    """haliax's state-dict module, checked to still be what `_writer_alone_in_save_state_dict` patches: if haliax
    renames the barrier, assigning it would silently add an unused attribute and the pod hang would return."""
    from haliax._src import state_dict as hax_state_dict

    if not hasattr(hax_state_dict, "sync_global_devices") or "sync_global_devices" not in (
        hax_state_dict.save_state_dict.__code__.co_names
    ):
        raise RuntimeError(
            "haliax changed: haliax._src.state_dict.save_state_dict no longer calls sync_global_devices; "
            "revisit alpaca_cli/core/export.py:_writer_alone_in_save_state_dict"
        )
    return hax_state_dict
