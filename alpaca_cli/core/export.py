"""`alpaca export`: a trained checkpoint -> a Hugging Face checkpoint (safetensors, config, tokenizer, generation
config, model card), optionally verified against Levanter and uploaded to the Hub.

Levanter's converter writes the weights shard by shard (one shard on the host at a time) but its config.json is
built from Levanter's model config: the training seq_len becomes max_position_embeddings, every default is
written, and `begin_suppress_tokens` stops generation from ever starting with EOS. The config written here is the
base model's own config.json with only the vocabulary size, dtype and special-token ids changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass

from alpaca_cli import __version__, distributed, io
from alpaca_cli.config import ExportConfig
from alpaca_cli.core.checkpoints import find_checkpoint, load_model, open_run_base
from alpaca_cli.core.logits import for_inference, model_logits
from alpaca_cli.core.mesh import COMPUTE, FSDP, local_mesh
from alpaca_cli.core.prompts import PROMPTS_FILE, adds_bos, chat_template
from alpaca_cli.errors import AlpacaError, ConfigError
from alpaca_cli.records import ExportOutputs, ExportRecord, ExportSummary
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
EXPORT_MARKER = ".alpaca-export.json"
"""Written into every export folder with the identity of the run it came from (`run_id`): a folder is replaced only
when it holds this run's marker (and --overwrite is given); any other non-empty folder is refused. Not pushed."""


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    examples: int
    tokens: int
    torch_loss: float
    levanter_loss: float
    eos_stop_rate: float | None = None
    """Share of the examples' prompts whose greedy answer (Levanter, cached decoding) ends with EOS."""
    eos_stopped: int = 0
    eos_max_new_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportResult:
    export_dir: str
    dtype: str
    step: int
    files: list[str]
    weight_bytes: int
    peak_rss_bytes: int
    seconds: float
    repo_url: str | None = None
    repo_id: str | None = None
    commit: str | None = None
    verify: VerifyResult | None = None


def resolve_token(cfg: ExportConfig) -> str | None:
    """With --push-to-hub, what the push needs, checked before any work: a --repo-id the Hub accepts (by
    huggingface_hub's own validator), the Hub not switched off (HF_HUB_OFFLINE), and a token (HF_TOKEN or the
    huggingface_hub login), which it returns."""
    if not cfg.push_to_hub:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if cfg.repo_id is not None:
        try:
            validate_repo_id(cfg.repo_id)
        except HFValidationError as e:
            reason = str(e).split(f": '{cfg.repo_id}'")[0]  # huggingface_hub's sentence, without the id repeated
            raise ConfigError(f"--repo-id {cfg.repo_id!r} is not a Hub repo id: {reason}",
                              hint="give NAMESPACE/NAME (e.g. YOU/llama2-alpaca), or NAME for your own namespace")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push-to-hub: the Hub cannot be reached, offline mode is on (HF_HUB_OFFLINE=1)",
                          hint="unset HF_HUB_OFFLINE to push, or export without --push-to-hub")
    token = get_token()
    if not token:
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token",
            hint="set HF_TOKEN, or run `huggingface-cli login` (the token is never written anywhere by alpaca)",
        )
    return token


def export(cfg: ExportConfig, run: RunDir) -> ExportResult | None:
    """Write the checkpoint as a Hugging Face folder (and verify, and push). On a pod the writer (process 0) exports
    with its own devices while the other processes wait for its outcome: they get None."""
    t0 = time.time()
    token = resolve_token(cfg)
    if cfg.verify:
        _require_torch()
    dtype_name = _resolve_dtype(cfg, run)
    checkpoint = find_checkpoint(run, cfg.step)
    export_dir = io.normalize(cfg.output) if cfg.output else run.export_dir
    _check_writable(export_dir)
    import humanfriendly

    try:
        max_shard = humanfriendly.parse_size(cfg.max_shard_size)
    except humanfriendly.InvalidSize:
        raise ConfigError(f"--max-shard-size {cfg.max_shard_size!r} is not a size like 5GB") from None

    def work() -> ExportResult:
        check_output(export_dir, run, cfg.overwrite)
        record = ExportRecord(config=cfg, checkpoint=run.relative(checkpoint.path), step=checkpoint.step)
        with run.stage("export", record):
            result = _export_here(cfg, run, checkpoint, export_dir, dtype_name, max_shard, token)
            result.seconds = time.time() - t0
            record.outputs = ExportOutputs(
                export_dir=run.relative(export_dir), dtype=dtype_name, step=checkpoint.step, files=result.files,
                repo_id=result.repo_id, repo_url=result.repo_url, commit=result.commit,
                revision=(cfg.revision or "main") if result.repo_url else None,
            )
            v = result.verify
            record.summary = ExportSummary(
                weight_bytes=result.weight_bytes, peak_rss_bytes=result.peak_rss_bytes,
                verify_max_abs_diff=v.max_abs_diff if v else None, verify_tolerance=v.tolerance if v else None,
                verify_examples=v.examples if v else None, verify_tokens=v.tokens if v else None,
                verify_loss=v.torch_loss if v else None, verify_eos_stop_rate=v.eos_stop_rate if v else None,
                verify_eos_stopped=v.eos_stopped if v else None,
                verify_eos_max_new_tokens=v.eos_max_new_tokens if v else None,
            )
        return result

    return distributed.on_writer(work, encode=lambda r: None, decode=lambda _: None)


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--verify needs torch to load the export with transformers", hint="pip install 'alpaca-cli[torch]'"
        ) from None


def _resolve_dtype(cfg: ExportConfig, run: RunDir) -> str:
    """--dtype, else the base checkpoint's own (`torch_dtype`, or `dtype` as newer transformers write it)."""
    if cfg.dtype:
        return cfg.dtype
    try:
        base_cfg = json.loads(io.read_text(io.join(run.base_dir, "config.json")))
    except FileNotFoundError:
        base_cfg = {}
    name = base_cfg.get("torch_dtype") or base_cfg.get("dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), "float32")


def _check_writable(url: str) -> None:
    if io.is_remote(url):
        return
    probe = os.path.dirname(url.rstrip("/")) or "."
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK) or (os.path.exists(url) and not os.path.isdir(url)):
        raise ConfigError(f"--output {url}: cannot create a folder there ({probe} is not a writable directory)")


def check_output(out: str, run: RunDir, overwrite: bool) -> None:
    """Refuse an --output whose export would replace what this run's exports did not write: the run directory, a
    folder holding it, its own state, a non-empty folder that is not an export of this run, or (without overwrite)
    an earlier export of this run."""
    hint = f"export to a folder of its own, e.g. --output {run.export_dir} (the default)"
    real_out, real_run = _real(out), _real(run.url)
    if _within(real_run, real_out):
        what = "is the run directory" if real_out == real_run else f"holds the run directory {run.url}"
        raise ConfigError(f"--output {out} {what}: an export there would replace the run", hint=hint)
    for state in run.state_paths():
        if _within(real_out, _real(state)):
            where = "" if real_out == _real(state) else "inside "
            raise ConfigError(f"--output {out} is {where}the run's own {run.relative(state)}", hint=hint)
    names = io.listdir(out) if io.is_remote(out) or os.path.isdir(out) else []
    if not names:
        return
    marker = _read_marker(out) if EXPORT_MARKER in names else {}
    if marker.get("run_id") != run.run_id:
        what = f"holds an export of another run ({marker.get('run_dir')})" if marker else "is not empty"
        raise ConfigError(f"--output {out} {what}; an export replaces only an earlier export of this run",
                          hint="give another --output, or empty that folder yourself")
    if not overwrite:
        raise ConfigError(f"--output {out} holds an earlier export of this run",
                          hint="add --overwrite to replace it, or give another --output")


def _real(url: str) -> str:
    return url.rstrip("/") if io.is_remote(url) else os.path.realpath(url)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _read_marker(folder: str) -> dict:
    try:
        marker = json.loads(io.read_text(io.join(folder, EXPORT_MARKER)))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _finish(run: RunDir, checkpoint, staging: str, export_dir: str) -> list[str]:
    """Mark the finished folder as this run's export, put it in place; the names of its files."""
    with open(os.path.join(staging, EXPORT_MARKER), "w") as f:
        json.dump({"run_id": run.run_id, "run_dir": run.url, "step": checkpoint.step}, f, indent=2)
    files = sorted(os.listdir(staging))
    _publish(staging, export_dir)
    return files


def _export_here(cfg, run, checkpoint, export_dir, dtype_name, max_shard, token) -> ExportResult:
    import haliax as hax
    import jax.numpy as jnp

    tok = run.load_tokenizer()
    prompts = run.require_prepare().config.prompts
    tok.chat_template = chat_template(prompts, bos=adds_bos(tok))  # saved into tokenizer_config.json
    # this process's devices only (other hosts of a pod wait for the outcome), FSDP: no device holds the whole model
    mesh = local_mesh(all_devices=True)
    mapping = FSDP
    staging = tempfile.mkdtemp(prefix="alpaca-export-")
    try:
        if cfg.adapter:
            with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
                verify = _export_adapter(cfg, run, checkpoint, staging, tok, mapping, mesh, export_dir)
            weight_bytes = os.path.getsize(os.path.join(staging, "adapter_model.safetensors"))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            files = _finish(run, checkpoint, staging, export_dir)
            result = ExportResult(export_dir=export_dir, dtype="float32", step=checkpoint.step, files=files,
                                  weight_bytes=weight_bytes, peak_rss_bytes=peak, seconds=0.0, verify=verify)
            if cfg.push_to_hub:
                source = export_dir if not io.is_remote(export_dir) else staging
                result.repo_id, result.repo_url, result.commit = push(source, run, cfg, token, export_dir)
            return result
        with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
            model, lev_config, base_hf_config = load_model(run, checkpoint, tokenizer=tok, axis_mapping=mapping, mesh=mesh)
            with open_run_base(run) as base:
                converter = base.converter(tok)
                with _writer_alone_in_save_state_dict():
                    converter.save_pretrained(
                        model, staging, save_tokenizer=True, max_shard_size=max_shard, dtype=jnp.dtype(dtype_name),
                        save_reference_code=False,
                    )
            _write_configs(run, staging, tok, dtype_name)
            weight_bytes = sum(
                os.path.getsize(os.path.join(staging, f)) for f in os.listdir(staging) if f.endswith(".safetensors")
            )
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            verify = None
            if cfg.verify:
                verify = verify_export(staging, model, run, tok, dtype_name, cfg)
                if not verify.ok:
                    raise AlpacaError(
                        f"--verify: the export's logits differ from Levanter's by {verify.max_abs_diff:.3g} "
                        f"(tolerance {verify.tolerance:g}); the export at {export_dir} was not written"
                    )
            _write_model_card(run, staging, checkpoint, dtype_name, verify)
        files = _finish(run, checkpoint, staging, export_dir)
        result = ExportResult(export_dir=export_dir, dtype=dtype_name, step=checkpoint.step, files=files,
                              weight_bytes=weight_bytes, peak_rss_bytes=peak, seconds=0.0, verify=verify)
        if cfg.push_to_hub:
            source = export_dir if not io.is_remote(export_dir) else staging
            result.repo_id, result.repo_url, result.commit = push(source, run, cfg, token, export_dir)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_adapter(cfg, run, checkpoint, staging, tok, mapping, mesh, export_dir):
    """A LoRA run's adapters in PEFT's format, with the prepared tokenizer (its [PAD]), the templates and a card."""
    from alpaca_cli.core import lora

    train = run.require_train()
    if train.lora is None:
        raise ConfigError(f"--adapter: run {run.url} trained every weight, so it has no adapter",
                          hint="export the model itself (without --adapter)")
    model, _, _ = load_model(run, checkpoint, tokenizer=tok, axis_mapping=mapping, mesh=mesh, merge=False)
    base_spec = _base_reference(train.inputs.model)
    lora.save_adapter(model, train.lora, base_spec, staging)
    tok.save_pretrained(staging)
    with open(os.path.join(staging, PROMPTS_FILE), "w") as f:
        json.dump(dataclasses.asdict(run.require_prepare().config.prompts), f, indent=2)
    verify = None
    if cfg.verify:
        verify = verify_adapter(staging, lora.merge(model), run, tok, cfg, train.inputs.model)
        if not verify.ok:
            raise AlpacaError(
                f"--verify: PEFT's logits with the adapter differ from Levanter's by {verify.max_abs_diff:.3g} "
                f"(tolerance {verify.tolerance:g}); the adapter at {export_dir} was not written"
            )
    _write_adapter_card(run, staging, checkpoint, base_spec, verify)
    return verify


def _base_reference(spec: str) -> str:
    """What an adapter names as its base: the Hub id, or the folder (absolute), or the demo model's cache folder."""
    from alpaca_cli.core.models import DEMO_MODEL

    if spec == DEMO_MODEL:
        from alpaca_cli.core.demo_model import demo_model_dir

        return demo_model_dir()
    return os.path.abspath(os.path.expanduser(spec)) if os.path.exists(os.path.expanduser(spec)) else spec


def verify_adapter(folder: str, merged, run: RunDir, tok, cfg: ExportConfig, base_spec: str) -> VerifyResult:
    """transformers' base model, its embeddings resized to the prepared tokenizer, with PEFT's adapter loaded, against
    Levanter's merged model: the logits on prepared examples (float32)."""
    try:
        import peft
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("--verify with --adapter needs torch and peft", hint="pip install torch peft") from None
    from alpaca_cli.core.models import open_base_model

    with open_base_model(base_spec) as base:
        hf = AutoModelForCausalLM.from_pretrained(base.ref, dtype=torch.float32, attn_implementation="eager")
    old = hf.get_input_embeddings().weight.shape[0]
    hf.resize_token_embeddings(len(tok))
    with torch.no_grad():  # new rows: exactly the mean of the others, as training initialised [PAD] (and Stanford)
        for w in {id(x): x for x in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            w[old:] = w[:old].mean(0)
    hf = peft.PeftModel.from_pretrained(hf, folder).eval()
    return _compare(hf, merged, run, tok, "float32",
                    cfg.verify_tolerance if cfg.verify_tolerance is not None else 1e-4, cfg.verify_examples)


def _write_adapter_card(run: RunDir, folder: str, checkpoint, base_spec: str, verify) -> None:
    train, prep = run.require_train(), run.require_prepare()
    lo, prompts = train.lora, prep.config.prompts
    example = prompts.prompt_no_input.format(instruction="Give three tips for staying healthy.")
    lines = ["---", "library_name: peft", f"base_model: {base_spec}", "tags:", "- alpaca", "- lora", "- levanter",
             "---", "", f"# {run.name} (LoRA adapter)", "",
             f"A LoRA adapter (rank {lo.r}, alpha {lo.alpha:g}, on {', '.join(lo.targets)}) instruction-tuned from "
             f"`{train.inputs.model}` the way Stanford Alpaca was, with alpaca {__version__} on Levanter, "
             f"checkpoint `step-{checkpoint.step}`.", "",
             "The tokenizer here is the base model's with the tokens training added "
             f"({', '.join(prep.summary.added_tokens.values()) or 'none'}): resize the base model's embeddings to it "
             "and set the new rows to the mean of the others (Stanford Alpaca's initialisation; with LoRA the "
             "embeddings stayed frozen, so that is what training used) before loading the adapter.", "",
             "```python", "import torch", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "", 'tok = AutoTokenizer.from_pretrained("<this folder or repo>")',
             f'model = AutoModelForCausalLM.from_pretrained("{base_spec}")',
             "old = model.get_input_embeddings().weight.shape[0]",
             "model.resize_token_embeddings(len(tok))",
             "with torch.no_grad():",
             "    for w in {id(x): x for x in (model.get_input_embeddings().weight,",
             "                                 model.get_output_embeddings().weight)}.values():",
             "        w[old:] = w[:old].mean(0)",
             'model = PeftModel.from_pretrained(model, "<this folder or repo>")',
             f"prompt = {example!r}", 'ids = tok(prompt, return_tensors="pt").input_ids',
             "out = model.generate(input_ids=ids, max_new_tokens=256)",
             "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", "",
             "Prompt templates (`alpaca_prompts.json`):", "", "```text", prompts.prompt_input, "```", "", "```text",
             prompts.prompt_no_input, "```", ""]
    if verify is not None:
        lines += [f"Checked: PEFT's logits with this adapter equal Levanter's within {verify.max_abs_diff:.2g} on "
                  f"{verify.examples} prepared examples.", ""]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines))


@contextlib.contextmanager
def _writer_alone_in_save_state_dict():
    """Workaround for haliax 1.4.dev453, still so in marin-haliax 0.2.20 (state_dict.py:420):
    `haliax._src.state_dict.save_state_dict` (which Levanter's `save_pretrained` calls for every safetensors shard) ends with `sync_global_devices`, a collective over every
    process of the pod. Our export runs on the writer's own devices while the other hosts wait for its outcome
    (`distributed.on_writer`), so that barrier can never complete: a hang on a TPU or GPU pod, and on CPU processes
    "Gloo context initialization failed: DEADLINE_EXCEEDED" after 30 s. Inside this block the barrier is skipped.
    Tested by test_multihost.py::test_two_processes_equal_one_process_with_four_devices (the export on two hosts)."""
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


def _publish(staging: str, out_url: str) -> None:
    """Put the finished folder in place (check_output has made sure nothing else is there). Locally the earlier export
    (if any) is swapped out only once the new one is complete, and put back if the swap fails; a failure leaves no
    hidden folder behind. On object stores the marker goes first (a partial upload is recognisably this run's),
    then the files, then any stale file of the earlier export is removed; a failed upload into an empty folder is
    removed again."""
    if io.is_remote(out_url):
        old = set(io.listdir(out_url))
        try:
            with open(os.path.join(staging, EXPORT_MARKER), "rb") as f:
                io.write_bytes_atomic(io.join(out_url, EXPORT_MARKER), f.read())
            io.upload_dir(staging, out_url)
        except BaseException:
            if not old:
                with contextlib.suppress(Exception):
                    io.rm_tree(out_url)
            raise
        fs, path = io.fs_and_path(out_url)
        for name in old - set(os.listdir(staging)):
            fs.rm(f"{path}/{name}", recursive=True)
        return
    parent = os.path.dirname(out_url.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    trash = None
    try:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
        if os.path.exists(out_url):
            trash = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
            os.replace(out_url, os.path.join(trash, "old"))
            try:
                os.replace(tmp, out_url)
            except BaseException:
                os.replace(os.path.join(trash, "old"), out_url)  # the earlier export back in place
                raise
        else:
            os.replace(tmp, out_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap succeeded
        if trash is not None and os.path.exists(out_url):  # never the earlier export while it is not back in place
            shutil.rmtree(trash, ignore_errors=True)


def _write_configs(run: RunDir, folder: str, tok, dtype_name: str) -> None:
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

    prompts = run.require_prepare().config.prompts
    with open(os.path.join(folder, PROMPTS_FILE), "w") as f:
        json.dump(dataclasses.asdict(prompts), f, indent=2)


def _evaluation_lines(run: RunDir, verify) -> list[str]:
    lines = []
    if verify is not None:
        lines += ["## Export check", "",
                  f"transformers' logits on {verify.examples} prepared examples equal Levanter's within "
                  f"{verify.max_abs_diff:.2g}; loss on their {verify.tokens} trained tokens {verify.torch_loss:.4f}."]
        if verify.eos_stop_rate is not None:
            lines += [f"Greedy answers to their prompts ended with EOS in {verify.eos_stopped} of {verify.examples} "
                      f"cases within {verify.eos_max_new_tokens} tokens."]
        lines += [""]
    ev = run.eval
    if ev is not None and ev.complete and ev.scores:
        lines += ["## Evaluation", "", f"Held-out records: `{os.path.basename(ev.data)}` (`alpaca eval`).", "",
                  "| model | examples | loss | perplexity | EOS-stop rate |", "| --- | ---: | ---: | ---: | ---: |"]
        for sc in ev.scores:
            lines.append(f"| {sc.model} | {sc.examples} | {sc.loss:.4f} | {sc.perplexity:.2f} | "
                         f"{100 * sc.eos_stop_rate:.1f}% (within {sc.max_new_tokens} tokens) |")
        lines += [""]
    return lines


def refresh_model_card(run: RunDir) -> None:
    """Rewrite the export's model card (after `alpaca eval`, whose scores it lists)."""
    from alpaca_cli.core.checkpoints import Checkpoint

    record = run.export
    out = record.outputs
    export_dir = run.resolve(out.export_dir)
    tmp = tempfile.mkdtemp(prefix="alpaca-card-")
    try:
        _write_model_card(run, tmp, Checkpoint(path=run.resolve(record.checkpoint), step=record.step), out.dtype,
                          verify=_last_verify(record))
        with open(os.path.join(tmp, "README.md"), "rb") as f:
            io.write_bytes_atomic(io.join(export_dir, "README.md"), f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _last_verify(record):
    s = record.summary
    if s is None or s.verify_max_abs_diff is None:
        return None
    return VerifyResult(max_abs_diff=s.verify_max_abs_diff, tolerance=s.verify_tolerance or 0.0, examples=s.verify_examples,
                        tokens=s.verify_tokens, torch_loss=s.verify_loss or 0.0, levanter_loss=s.verify_loss or 0.0,
                        eos_stop_rate=s.verify_eos_stop_rate, eos_stopped=s.verify_eos_stopped or 0,
                        eos_max_new_tokens=s.verify_eos_max_new_tokens or 0)


def _write_model_card(run: RunDir, folder: str, checkpoint, dtype_name: str, verify=None) -> None:
    prep = run.require_prepare()
    train = run.require_train()
    pcfg, plan, summary = prep.config, train.plan, prep.summary
    data = prep.inputs.data
    data_desc = (
        f"[{data.id}](https://huggingface.co/datasets/{data.id}) (split `{data.split}`, revision `{data.revision}`)"
        if data.kind == "hub"
        else f"`{os.path.basename(pcfg.data)}` (sha256 `{data.sha256}`)"
    )
    base = train.inputs.model
    final_loss = train.summary.final_loss if train.summary else None
    opt = plan.optimizer
    prompts = pcfg.prompts
    hub_base = base if ("/" in base and not os.path.exists(base) and "://" not in base) else None
    front = ["---", "library_name: transformers", "tags:", "- alpaca", "- instruction-tuning", "- levanter"]
    if hub_base:
        front += [f"base_model: {hub_base}"]
    front += ["---", ""]
    example = prompts.prompt_no_input.format(instruction="Give three tips for staying healthy.")
    lines = front + [
        f"# {run.name}",
        "",
        f"Instruction-tuned from `{base}` the way Stanford Alpaca was, with alpaca {__version__} on Levanter.",
        "",
        "## How to prompt it",
        "",
        "Format the request with the template below (the first one when there is an input, the second when there is "
        "none), then let the model continue; it ends its answer with the EOS token.",
        "",
        "With an input:",
        "",
        "```text",
        prompts.prompt_input,
        "```",
        "",
        "Without an input:",
        "",
        "```text",
        prompts.prompt_no_input,
        "```",
        "",
        "The tokenizer carries a chat template that renders a user message as exactly this prompt (an `input` "
        "field in the same message selects the first template), so chat interfaces prompt it the way it was "
        "trained. With transformers:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'chat = pipeline("text-generation", model="<this folder or repo>")',
        'messages = [{"role": "user", "content": "Give three tips for staying healthy."}]',
        'print(chat(messages, max_new_tokens=256)[0]["generated_text"][-1]["content"])',
        "```",
        "",
        "or with the prompt written out:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("<this folder or repo>")',
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
        f"prompt = {example!r}",
        'ids = tok(prompt, return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=256)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "With vLLM (an OpenAI-compatible server; the chat template is applied for you):",
        "",
        "```bash",
        "vllm serve <this folder or repo>",
        "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        "  -d '{\"model\": \"<this folder or repo>\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"Give three tips for staying healthy.\"}]}'",
        "```",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`",
        f"- Data: {data_desc}; {summary.examples} examples kept of {summary.records_read} "
        f"records (max length {pcfg.max_length} tokens, overflow: {pcfg.on_overflow}, "
        f"{'prompt tokens masked out of the loss' if pcfg.mask_inputs else 'every token trained'})",
        f"- Data fingerprint: `{prep.fingerprint}`",
        f"- Recipe: {plan.steps} steps of {plan.batch_size_examples} examples "
        f"({plan.epochs} epochs), AdamW lr {opt.learning_rate}, weight decay {opt.weight_decay}, "
        f"warmup {opt.warmup}, {opt.lr_schedule} schedule, precision {plan.precision}, "
        f"rows of {plan.seq_len} tokens {'packed' if plan.pack else 'padded'}",
        f"- Final training loss: {final_loss:.4f}" if isinstance(final_loss, (int, float)) else "- Final training loss: n/a",
        f"- Checkpoint: `step-{checkpoint.step}`, exported as {dtype_name}",
        f"- alpaca version: {__version__}",
        "",
    ] + _evaluation_lines(run, verify)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines))


def verify_export(folder: str, lev_model, run: RunDir, tok, dtype_name: str, cfg: ExportConfig) -> VerifyResult:
    """Load the export with transformers (torch) and compare its logits with Levanter's on prepared examples."""
    import torch
    from transformers import AutoModelForCausalLM

    tolerance = cfg.verify_tolerance if cfg.verify_tolerance is not None else (1e-4 if dtype_name == "float32" else 5e-2)
    # eager: transformers' reference attention (its SDPA path skips Gemma-2's attention soft-capping)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name), attn_implementation="eager")
    hf = hf.float().eval()  # compare in float32: the export's rounding, not torch's bf16 kernels, is what we test
    return _compare(hf, lev_model, run, tok, dtype_name, tolerance, cfg.verify_examples)


def _compare(hf, lev_model, run: RunDir, tok, dtype_name: str, tolerance: float, examples: int) -> VerifyResult:
    """transformers' (torch) logits against Levanter's on the first prepared examples, and the EOS-stop rate."""
    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core import cache as cachemod

    prepared = cachemod.open_run_cache(run)
    n = min(examples, len(prepared))
    rows = prepared.rows(range(n))

    # Levanter side: the trained model rounded to the export dtype, computed in float32 at full precision
    # (only floating arrays: models carry other leaves too, e.g. GPT-2's static flags), dropout off as transformers'
    lev = for_inference(jax.tree_util.tree_map(
        lambda x: x.astype(dtype_name).astype(jnp.float32) if eqx.is_inexact_array(x) else x, lev_model
    ))

    @hax.named_jit
    def logits_fn(model, ids):
        return model_logits(model, ids, AttentionMask.causal())

    max_diff = 0.0
    t_loss = l_loss = 0.0
    count = 0
    with jax.default_matmul_precision("float32"), hax.axis_mapping(COMPUTE):
        for row in rows:
            ids = row["input_ids"]
            Pos = lev.Pos.resize(len(ids))
            lev_logits = np.asarray(logits_fn(lev, hax.named(jnp.asarray(ids, dtype=jnp.int32), Pos)).array, dtype=np.float64)
            with torch.no_grad():
                hf_logits = hf(input_ids=torch.tensor([ids.tolist()])).logits[0].double().numpy()
            max_diff = max(max_diff, float(np.abs(lev_logits - hf_logits).max()))
            targets = row["targets"].astype(bool)[1:]
            t_loss += _nll(hf_logits, ids, targets)
            l_loss += _nll(lev_logits, ids, targets)
            count += int(targets.sum())
    eos_rate, stopped = _eos_stop_rate(lev, tok, rows, EOS_CHECK_TOKENS)
    return VerifyResult(max_abs_diff=max_diff, tolerance=tolerance, examples=n, tokens=count,
                        torch_loss=t_loss / max(count, 1), levanter_loss=l_loss / max(count, 1),
                        eos_stop_rate=eos_rate, eos_stopped=stopped, eos_max_new_tokens=EOS_CHECK_TOKENS)


EOS_CHECK_TOKENS = 256


def _eos_stop_rate(model, tok, rows, max_new_tokens: int) -> tuple[float | None, int]:
    """Greedy answers to the examples' prompts (the tokens before their first trained one): how many end with EOS.
    None when the run trains on every token (no prompt to answer)."""
    import haliax as hax
    import numpy as np

    from alpaca_cli.core import decode

    prompts = []
    for row in rows:
        trained = np.flatnonzero(row["targets"][1:]) + 1
        if not len(trained) or trained[0] < 2 or row["targets"][: trained[0]].sum() != 0:
            return None, 0
        prompts.append(row["input_ids"][: trained[0]].tolist())
    with hax.axis_mapping(COMPUTE):
        gens = decode.generate(model, prompts, max_new_tokens=max_new_tokens, max_len=model.Pos.size,
                               eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id or 0, real_vocab=len(tok))
    stopped = sum(g.finish == decode.EOS for g in gens)
    return stopped / len(gens), stopped


def _nll(logits, ids, targets) -> float:
    """Summed next-token negative log-likelihood over the trained positions."""
    import numpy as np

    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]][targets].sum())


def push(folder: str, run: RunDir, cfg: ExportConfig, token: str | None,
         export_dir: str) -> tuple[str, str, str | None]:
    """Create the repo if needed and upload the folder (the export, already complete at export_dir); returns
    (repo_id, url, commit oid)."""
    import requests
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        repo_id = cfg.repo_id or f"{api.whoami()['name']}/{run.name}"
        url = api.create_repo(repo_id, private=cfg.private, exist_ok=True, repo_type="model")
        if cfg.revision and cfg.revision != "main":
            api.create_branch(repo_id, branch=cfg.revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, revision=cfg.revision, ignore_patterns=[EXPORT_MARKER],
            commit_message=cfg.commit_message or f"alpaca export of {run.name}",
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise AlpacaError(
            f"upload to the Hub failed ({status}: {_redact(str(e).splitlines()[0], token)})",
            hint="check --repo-id, that your token may write there, and your network",
        ) from None
    except (requests.ConnectionError, requests.Timeout, OfflineModeIsEnabled) as e:
        raise AlpacaError(
            _redact(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_network_reason(e)}); the export "
                    f"itself is complete at {export_dir}", token),
            hint=_push_again_hint(cfg, run, export_dir),
        ) from None
    return repo_id, str(url), getattr(info, "oid", None)


def _network_reason(e: BaseException) -> str:
    """The innermost socket-level reason of a failed request ("Connection refused", "timed out", ...): requests
    wraps it in urllib3's retry and connection errors."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        todo += [y for y in (*getattr(x, "args", ()), getattr(x, "reason", None), x.__cause__, x.__context__)
                 if isinstance(y, BaseException)]
    return "timed out" if "timed out" in str(e).lower() else type(e).__name__


def _push_again_hint(cfg: ExportConfig, run: RunDir, export_dir: str) -> str:
    if io.is_remote(export_dir):
        return "run this export again with --push-to-hub --overwrite once the Hub can be reached"
    flags = (" --private" if cfg.private else "") + (f" --revision {cfg.revision}" if cfg.revision else "")
    repo = cfg.repo_id or f"YOUR_NAME/{run.name}"
    return (f"once the Hub can be reached, push it with `hf upload {repo} {export_dir} .{flags} --exclude "
            f"{EXPORT_MARKER}`, or run this export again with --overwrite")


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
