"""Stage configurations and the one precedence rule that resolves them.

Precedence, lowest to highest: dataclass defaults < `--config FILE` (YAML) < `--set a.b=v` < typed flags (`--steps`).
Typed flags are None when not given and then do not count, so a flag default never beats the config file.
Unknown keys are errors.

TrainConfig nests Levanter's TrainerConfig and OptimizerConfig and lives in `_train_config.py` so that importing
this module stays cheap (`alpaca --help` must not import JAX); `config.TrainConfig` loads it on first use.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, TypeVar

import yaml

from alpaca_cli.errors import ConfigError

T = TypeVar("T")

# Stanford Alpaca's templates, byte for byte (tatsu-lab/stanford_alpaca train.py, PROMPT_DICT).
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

RECIPE_MODEL = "meta-llama/Llama-2-7b-hf"
RECIPE_DATA = "tatsu-lab/alpaca"
ON_OVERFLOW = ("truncate", "drop", "error")


@dataclass
class PromptTemplates:
    """The two Alpaca templates; `{instruction}` and `{input}` are replaced by the record's fields."""

    prompt_input: str = STANFORD_PROMPT_INPUT
    """Used when the record has a non-empty input."""
    prompt_no_input: str = STANFORD_PROMPT_NO_INPUT
    """Used when the record's input is missing or the empty string."""


@dataclass
class PrepareConfig:
    """`alpaca prepare`: records -> prompts -> tokens -> Levanter cache."""

    data: str = RECIPE_DATA
    """A Hub dataset id, or a .json / .jsonl / .jsonl.gz file (local path, gs:// or any fsspec URL)."""
    split: str = "train"
    """Split of a Hub dataset."""
    revision: Optional[str] = None
    """Revision (branch, tag or commit) of a Hub dataset."""
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    prompts: PromptTemplates = field(default_factory=PromptTemplates)
    """The templates; Stanford Alpaca's by default."""
    tokenizer: str = RECIPE_MODEL
    """A Hub id or a tokenizer folder (local or remote). [PAD] is added when it has no pad token."""
    max_length: int = 512
    """Longest example in tokens (prompt + response + EOS), Stanford's 512 by default."""
    on_overflow: str = "truncate"
    """What to do with longer examples: truncate (as Stanford), drop, or error."""
    mask_inputs: bool = True
    """Mask the prompt tokens out of the loss (Stanford). False trains on every token."""

    def __post_init__(self):
        problems = []
        if self.max_length < 2:
            problems.append(f"max_length must be at least 2, got {self.max_length}")
        if self.on_overflow not in ON_OVERFLOW:
            problems.append(f"on_overflow must be one of {', '.join(ON_OVERFLOW)}, got {self.on_overflow!r}")
        for name in ("instruction_field", "input_field", "output_field"):
            if not getattr(self, name):
                problems.append(f"{name} must not be empty")
        if problems:
            raise ConfigError(problems)


@dataclass
class ExportConfig:
    """`alpaca export`: Levanter checkpoint -> Hugging Face checkpoint, optionally on the Hub."""

    output: Optional[str] = None
    """Where to write the checkpoint (local or gs://). Default: RUN/hf."""
    step: Optional[int] = None
    """Export this checkpoint step instead of the final one."""
    dtype: Optional[str] = None
    """float32, bfloat16 or float16. Default: the base model's torch_dtype."""
    max_shard_size: str = "5GB"
    """Largest safetensors file."""
    push_to_hub: bool = False
    repo_id: Optional[str] = None
    """Default: <your user>/<run name>."""
    private: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None
    verify: bool = False
    """Load the export with transformers (torch) and compare logits with Levanter's."""
    verify_examples: int = 4
    verify_tolerance: Optional[float] = None
    """Largest allowed |logit difference|. Default: 1e-4 for float32 exports, 5e-2 for 16-bit ones."""


def __getattr__(name: str):
    if name == "TrainConfig":
        from alpaca_cli._train_config import TrainConfig

        return TrainConfig
    raise AttributeError(name)


# -- the precedence rule ------------------------------------------------------------------------------------------


def _merge(base: Any, override: Any) -> Any:
    """Deep-merge override into base. A choice (a dict with `type`) whose type changes is replaced whole."""
    if isinstance(base, dict) and isinstance(override, Mapping):
        if "type" in override and base.get("type") not in (None, override["type"]):
            return copy.deepcopy(dict(override))
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_set(items: Sequence[str] | None) -> dict:
    """`--set a.b=v` items -> nested dict; values are YAML (so 1e-5, true, [a, b] work)."""
    out: dict = {}
    problems = []
    for item in items or ():
        if "=" not in item:
            problems.append(f"--set {item!r} is not of the form key=value (e.g. --set optimizer.learning_rate=1e-5)")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    if problems:
        raise ConfigError(problems)
    return out


def read_yaml(path: str, what: str = "config file") -> Any:
    """A YAML (or JSON: YAML is a superset) file, local or remote; ConfigError naming `what` on any problem."""
    from alpaca_cli import io

    try:
        text = io.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML or JSON: {str(e).splitlines()[0]}") from None


def read_config_file(path: str) -> dict:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    config_path: str | None = None,
    set_items: Sequence[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    file_adapter=None,
) -> T:
    """Resolve cls from defaults < config file < --set < typed flags (dotted keys; None means not given)."""
    import draccus

    tree = draccus.encode(cls())
    if config_path:
        file_tree = read_config_file(config_path)
        if file_adapter is not None:
            file_tree = file_adapter(file_tree)
        tree = _merge(tree, file_tree)
    tree = _merge(tree, parse_set(set_items))
    for key, value in (flags or {}).items():
        if value is not None:
            override: dict = {}
            _set_dotted(override, key, value)
            tree = _merge(tree, override)
    try:
        return draccus.decode(cls, tree)
    except ConfigError:
        raise
    except Exception as e:  # draccus raises DecodingError / ParsingError with a readable message
        raise ConfigError(_config_error_text(e)) from None


def _config_error_text(e: Exception) -> str:
    text = str(e).strip().splitlines()
    msg = " ".join(line.strip() for line in text if line.strip())
    if "are not valid for" in msg:
        return f"unknown config key: {msg}"
    return f"invalid configuration: {msg}"


def dump(cfg: Any) -> str:
    """The resolved config as YAML (what goes into RUN/configs/<stage>.yaml)."""
    import draccus

    return yaml.safe_dump(draccus.encode(cfg), sort_keys=False, allow_unicode=True)


def encode(cfg: Any) -> dict:
    import draccus

    return draccus.encode(cfg)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
