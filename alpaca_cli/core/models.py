"""Base models: find the checkpoint, pick Levanter's model class from its config.json, convert it.

Levanter's `HFCheckpointConverter.from_hf` probes other model types on the Hub and fails offline, and model configs
carry Hub ids as their default reference checkpoint. Here the converter is always built for the config class that
the checkpoint's `model_type` names, with our tokenizer object and the checkpoint itself as reference, so a local
folder loads with no Hub access.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

from alpaca_cli import io
from alpaca_cli.core import families
from alpaca_cli.core.attention import AttentionChoice
from alpaca_cli.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"


@dataclass
class BaseModel:
    """A base checkpoint made ready to read: `ref` is a local folder or a Hub id."""

    spec: str
    ref: str
    hf_config: object
    model_type: str

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.ref)

    @property
    def context_length(self) -> int | None:
        cfg = self.hf_config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def lev_config_class(self):
        return families.family_of(self.model_type).config_class

    def check_supported(self, seq_len: int) -> None:
        """Refuse settings the Levanter model would compute differently from transformers at this row length."""
        problems = families.unsupported(self.hf_config, seq_len)
        if problems:
            raise ConfigError(f"--model {self.spec}: " + "; ".join(problems))

    def lev_config(self, seq_len: int, attention: AttentionChoice | None = None, remat: bool = True):
        """Levanter's config for this checkpoint, with the training row length, attention kernel and remat.

        Without an attention choice (export, generate: no training rows) the model gets vanilla attention, exact
        at any length."""
        from alpaca_cli.core.attention import levanter_fields

        cfg = self.lev_config_class().from_hf_config(self.hf_config)
        fields = {f.name for f in dataclasses.fields(cfg)}
        changes = {"max_seq_len": seq_len}
        if "reference_checkpoint" in fields:
            changes["reference_checkpoint"] = self.ref
        changes.update(levanter_fields(attention or AttentionChoice("vanilla", None), remat, cfg))
        return dataclasses.replace(cfg, **changes)

    def converter(self, tokenizer):
        from levanter.compat.hf_checkpoints import HFCheckpointConverter

        return HFCheckpointConverter(
            self.lev_config_class(),
            reference_checkpoint=self.ref,
            HfConfigClass=type(self.hf_config),
            tokenizer=tokenizer,
            trust_remote_code=False,
            ignore_prefix=families.family_of(self.model_type).ignore_prefix,
        )


@contextlib.contextmanager
def open_base_model(spec: str, flag: str = "--model") -> Iterator[BaseModel]:
    """Resolve a base model (Hub id, local folder, gs:// folder, or `demo`) and read its config.json. `flag` is the
    option that named it, for the messages (--model, --from-export)."""
    from alpaca_cli.core import demo_model

    if spec == DEMO_MODEL:
        with open_model_folder(spec, demo_model.ensure_demo_model(), flag) as bm:
            yield bm
        return
    if io.is_remote(spec):
        if not io.exists(io.join(spec, "config.json")):
            raise ConfigError(f"{flag} {spec}: no config.json there; expected a Hugging Face checkpoint folder")
        logger.info("Copying %s to local disk", spec)
        with io.local_dir(spec) as local, open_model_folder(spec, local, flag) as bm:
            yield bm
        return
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(f"{flag} {spec}: expected a Hugging Face checkpoint folder with a config.json")
        with open_model_folder(spec, os.path.abspath(path), flag) as bm:
            yield bm
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"{flag} {spec}: no such folder")
    with open_model_folder(spec, spec, flag) as bm:  # a Hub id
        yield bm


@contextlib.contextmanager
def open_model_folder(spec: str, ref: str, flag: str = "--model") -> Iterator[BaseModel]:
    """The model whose config.json is in `ref` (a local folder or a Hub id); `spec` is what the user gave."""
    hf_config = read_hf_config(spec, ref, flag)
    _check_model_type(f"{flag} {spec}", getattr(hf_config, "model_type", None))
    yield BaseModel(spec=spec, ref=ref, hf_config=hf_config, model_type=hf_config.model_type)


def _check_model_type(named: str, model_type) -> None:
    if model_type not in families.FAMILIES:
        raise ConfigError(
            f"{named}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(families.FAMILIES))}"
        )


def read_hf_config(spec: str, ref: str, flag: str = "--model"):
    from transformers import AutoConfig

    if os.path.isdir(ref):
        try:
            with open(os.path.join(ref, "config.json")) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{flag} {spec}: unreadable config.json ({e})") from None
        _check_model_type(f"{flag} {spec}", raw.get("model_type") if isinstance(raw, dict) else None)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"{flag} {spec}: cannot read its config ({first_line(e) or type(e).__name__})",
            hint="pass a local Hugging Face folder, or check the id, your network and HF_TOKEN for gated models",
        ) from None


COPY_WEIGHTS = "copy the model's weight files into it, or give the folder that has them"


def check_weights(base: BaseModel, what: str, hint: str) -> None:
    """Refuse a local model folder whose weights are missing or not whole (an interrupted copy, a full disk), in one
    line that names the folder (`what`) or the file, before anything reads them: Levanter would otherwise look the
    folder up on the Hub as a repo id, or fail deep in its reader. A safetensors file is whole when the header the
    safetensors library parses covers the file exactly (headers only: cheap). Hub ids are left to the download."""
    if not base.is_local:
        return
    from safetensors import SafetensorError, safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    names = set(os.listdir(base.ref))
    if SAFE_WEIGHTS_INDEX_NAME in names:  # sharded: the order in which Levanter's reader looks
        try:
            with open(os.path.join(base.ref, SAFE_WEIGHTS_INDEX_NAME)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{what}: {SAFE_WEIGHTS_INDEX_NAME} is damaged ({type(e).__name__}: {e})",
                              hint=hint) from None
        missing = [name for name in files if name not in names]
        if missing:
            raise ConfigError(f"{what}: {', '.join(missing)} (named in {SAFE_WEIGHTS_INDEX_NAME}) is missing",
                              hint=hint)
    elif SAFE_WEIGHTS_NAME in names:
        files = [SAFE_WEIGHTS_NAME]
    elif names & {WEIGHTS_NAME, WEIGHTS_INDEX_NAME}:
        return  # torch's pickles: read by torch, which says what is wrong
    else:
        raise ConfigError(f"{what} has no weights (no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or "
                          f"{WEIGHTS_NAME} in it)", hint=hint)
    for name in files:
        try:
            with safe_open(os.path.join(base.ref, name), "np"):
                pass
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{what}: {name} is truncated or damaged (safetensors: {e})", hint=hint) from None


def check_vocab(base: BaseModel, tokenizer, added: dict) -> None:
    """The prepared tokenizer must be the model's own plus what prepare added (e.g. [PAD]).

    Checked by size (every id the tokenizer produces needs an embedding row; checkpoints may pad their matrix by a
    few hundred rows) and, when the checkpoint folder has a tokenizer, token by token.
    """
    base_len = len(tokenizer) - len(added)
    hint = "prepare the run with this model's tokenizer: alpaca prepare --tokenizer <the model> --overwrite"
    what = f"{len(tokenizer)} tokens" + (f", with {', '.join(added.values())} added" if added else "")
    if base_len > base.vocab_size or base.vocab_size - base_len > 1024:
        raise ConfigError(
            f"the model's vocabulary ({base.vocab_size} tokens) does not fit the prepared tokenizer ({what})", hint=hint
        )
    if base.is_local and any(
        os.path.exists(os.path.join(base.ref, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        from transformers import AutoTokenizer

        try:
            own = AutoTokenizer.from_pretrained(base.ref)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer in the model folder is not ours to judge
            return
        prepared = {t: i for t, i in tokenizer.get_vocab().items() if t not in added.values()}
        if own.get_vocab() != prepared:
            raise ConfigError(
                f"the prepared tokenizer ({what}) is not the tokenizer of --model {base.spec}", hint=hint
            )


def base_model_as_trained(base, seq_len: int, tok, added: dict):
    """The base model as training starts from it (the [PAD] rows added as Stanford adds them), float32, FSDP over
    this process's devices: what `alpaca eval --base` compares the fine-tuned model with."""
    import haliax as hax
    import jmp

    from alpaca_cli.core.mesh import FSDP

    check_vocab(base, tok, added)
    lev_config = base.lev_config(seq_len)
    return load_base_weights(base, lev_config, tok, hax.Axis("vocab", len(tok)), FSDP, jmp.get_policy("p=f32,c=f32"))


def load_base_weights(base, lev_config, tok, Vocab, param_mapping, mp, dtype=None):
    """The base checkpoint as a Levanter model: vocabulary resized to the tokenizer (new rows = mean of the old
    ones in embeddings and LM head, as Stanford), padded for sharding if needed, parameters in param dtype (or
    `dtype`: LoRA's frozen base is held in the compute dtype)."""
    import haliax as hax

    check_weights(base, f"--model {base.spec}", hint=COPY_WEIGHTS)
    converter = base.converter(tok)
    try:
        model = converter.load_pretrained(
            lev_config.model_type, ref=base.ref, config=lev_config, axis_mapping=param_mapping,
            dtype=dtype or mp.param_dtype, resize_vocab_to_match_tokenizer=True,
        )
    except (KeyError, ValueError, TypeError) as e:  # a weight missing or of the wrong shape for this config
        raise ConfigError(
            f"--model {base.spec}: its weights do not match its config.json (model_type {base.model_type}): "
            f"{type(e).__name__}: {first_line(e, 200) or type(e).__name__}",
            hint="check that config.json belongs to these weights",
        ) from e
    if model.Vocab.size != Vocab.size:
        model = hax.named_jit(lambda m: m.resize_vocab(Vocab.size), axis_resources=param_mapping)(model)
    if dtype is not None:
        return model
    return hax.named_jit(mp.cast_to_param, axis_resources=param_mapping)(model)
