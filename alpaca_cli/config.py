"""Stage configurations, their defaults, and the one precedence rule that resolves them.

Precedence, lowest to highest: dataclass defaults < `--config FILE` (YAML) < `--set a.b=v` < typed flags (`--steps`).
Typed flags are None when not given and then do not count, so a flag default never beats the config file.
Unknown keys are errors.

Every option is declared here once, in a module cheap to import: a config field (type, default, docstring) and, where
a command offers it as a flag, one line of that command's `Flags` table (PREPARE_FLAGS, TRAIN_FLAGS, ...). The
commands' options, their help (`help_text`), the flags given to load_config and the flag names in error messages
(`Flags.named`) are derived from them. `train_config.TrainConfig` (which nests Levanter's TrainerConfig and
OptimizerConfig, and so imports JAX) builds its Levanter parts from `RECIPE_TRAINER` and `RECIPE_OPTIMIZER`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import yaml

from alpaca_cli.errors import ConfigError, first_line

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
RECORD_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
TRAIN_ON = ("all", "last")
MAX_LENGTH_LIMIT = 1 << 20
"""No model trains on examples longer than this (a million tokens); a larger --max-length is a typo."""
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# -- flags: the config keys each command offers as typed flags ----------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One config key offered as a command-line flag. Its type, default and help are the config field's (its
    docstring); `help` and `type` are given only for keys without a field here (Levanter's `trainer.` and
    `optimizer.` keys) or where the flag reads the value in its own way (a comma-separated list)."""

    key: str
    name: str = ""
    """The flag's spelling. Default: `--` and the key's last part, dashed (`seq_len` -> `--seq-len`)."""
    help: str = ""
    type: Optional[type] = None
    parse: Optional[Callable[[Any], Any]] = None
    """Turns the flag's value into the config value."""
    min: Optional[int] = None
    show_default: bool = True

    @property
    def flag(self) -> str:
        return self.name or "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def off(self) -> str:
        """The flag that turns an on-by-default setting off."""
        return f"--no-{self.flag[2:]}"


class Flags:
    """A command's flags in the order its --help lists them: the one table from which the command's options, their
    help, the `flags` given to load_config and the flag names in error messages are derived."""

    def __init__(self, cls: type, *flags: Flag | str, set_example: str):
        self.cls = cls
        self.flags = tuple(f if isinstance(f, Flag) else Flag(f) for f in flags)
        self.set_example = set_example
        """A `--set` item for the help, e.g. `optimizer.beta2=0.95`."""
        self._by_key = {f.key: f for f in self.flags}

    def __iter__(self):
        return iter(self.flags)

    def __getitem__(self, key: str) -> Flag:
        return self._by_key[key]

    def flag_for(self, key: str) -> str:
        """The flag that sets `key`, or the key itself (for --set and the config file) where there is none."""
        f = self._by_key.get(key)
        return f.flag if f is not None else key

    def named(self, key: str) -> str:
        """`key (--flag)` for messages, or the key alone where no flag sets it."""
        flag = self.flag_for(key)
        return f"{key} ({flag})" if flag != key else key

    def given(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """{config key: value} for the flags in `values` (by key) that were given (not None)."""
        out = {}
        for f in self.flags:
            value = values.get(f.key)
            if value is not None:
                out[f.key] = f.parse(value) if f.parse is not None else value
        return out


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def short_number(x: float) -> str:
    """3e-4 rather than 0.0003: learning rates as papers write them."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class Settings:
    """What the user gave for a command's config: --config FILE, --set items and the typed flags (by config key)."""

    config_path: Optional[str] = None
    set_items: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)

    def resolve(self, cls: type[T], *, extra: Mapping[str, Any] | None = None, **kwargs: Any) -> T:
        """load_config(cls) from these settings; `extra` adds flags the command read itself (a file's contents)."""
        return load_config(cls, self.config_path, self.set_items, {**self.flags, **(extra or {})}, **kwargs)


@dataclass
class PromptTemplates:
    """The two Alpaca templates; `{instruction}` and `{input}` are replaced by the record's fields."""

    prompt_input: str = STANFORD_PROMPT_INPUT
    """Used when the record has a non-empty input."""
    prompt_no_input: str = STANFORD_PROMPT_NO_INPUT
    """Used when the record's input is missing or the empty string."""


SOURCE_KEYS = ("name", "data", "split", "revision", "format", "instruction_field", "input_field", "output_field",
               "messages_field", "conversations_field", "chat_template", "train_on", "prompts", "weight", "epochs",
               "val_fraction")
"""What one source of a mixture (`--data SPEC,key=value`, or an entry of a `data:` list) may set."""


@dataclass
class SourceConfig:
    """One source of a mixture. A key left out (None) takes the top-level setting of the same name."""

    data: str = ""
    """Hub dataset id or file, as --data."""
    name: Optional[str] = None
    """How tables and records name the source. Default: the file's stem, or the Hub id."""
    split: Optional[str] = None
    """Split of a Hub dataset."""
    revision: Optional[str] = None
    """Revision of a Hub dataset."""
    format: Optional[str] = None
    """alpaca, messages, sharegpt or auto."""
    instruction_field: Optional[str] = None
    """Record field holding the instruction."""
    input_field: Optional[str] = None
    """Record field holding the optional input."""
    output_field: Optional[str] = None
    """Record field holding the response."""
    messages_field: Optional[str] = None
    """Record field holding a messages conversation."""
    conversations_field: Optional[str] = None
    """Record field holding a ShareGPT conversation."""
    chat_template: Optional[str] = None
    """For conversations: the chat template (a file or a built-in name)."""
    train_on: Optional[str] = None
    """For conversations: all or last."""
    prompts: Optional[str] = None
    """For Alpaca records: a JSON or YAML file of prompt_input and prompt_no_input (default: the top-level ones)."""
    weight: Optional[float] = None
    """Sampling proportion: the expected share of training examples drawn from this source (weights are
    normalised over the sources)."""
    epochs: Optional[float] = None
    """Instead of a weight: passes over this source per pass over the mixture (weights become epochs x examples)."""
    val_fraction: Optional[float] = None
    """Held-out fraction of this source's examples (default: train's --val-fraction)."""

    @property
    def label(self) -> str:
        return self.name or source_name(self.data)


@dataclass
class ResolvedSource:
    """A source with every setting decided: `cfg` is a full single-source PrepareConfig (its prompts file, if
    any, still to be read: `prompts_file`)."""

    name: str
    weight: Optional[float]
    epochs: Optional[float]
    val_fraction: Optional[float]
    cfg: "PrepareConfig"
    prompts_file: Optional[str] = None


def source_name(data: str) -> str:
    """The default name of a source: a file's stem (no directories, no .json/.jsonl/.gz), or the Hub id."""
    base = data.rstrip("/").rsplit("/", 1)[-1] if ("://" in data or data.startswith((".", "/", "~"))
                                                   or data.endswith((".json", ".jsonl", ".gz"))) else data
    for suffix in (".gz", ".jsonl", ".json"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    return base or data


_SPEC_SPLIT = re.compile(r",(?=(?:%s)=)" % "|".join(SOURCE_KEYS))
_SPEC_KEY = re.compile(r",([A-Za-z_][A-Za-z0-9_]*)=")


def parse_source_spec(spec: str) -> dict:
    """`--data SPEC[,key=value...]` -> a SourceConfig tree. The spec splits at a comma only where a known key
    follows (so a file name may hold commas); values are YAML (weight=3 is a number)."""
    head, *items = _SPEC_SPLIT.split(spec)
    unknown = _SPEC_KEY.search(head)
    if unknown:
        raise ConfigError(f"--data {spec}: unknown source key {unknown.group(1)!r}",
                          hint="a source takes " + ", ".join(SOURCE_KEYS))
    out: dict = {"data": head}
    for item in items:
        key, raw = item.split("=", 1)
        if key in out:
            raise ConfigError(f"--data {spec}: {key} is given twice")
        out[key] = yaml.safe_load(raw) if key in ("weight", "epochs", "val_fraction") and raw != "" else raw
    return out


def data_list_to_sources(tree: dict) -> dict:
    """load_config's `adapt` for prepare: a list-valued `data` (repeated --data, or a `data:` list in the config
    file) becomes `sources`, one per item (a `SPEC,key=value` string or a mapping). One plain spec stays today's
    single `data`. The top-level `data` becomes the first source's."""
    data = tree.get("data")
    if not isinstance(data, list):
        return tree
    items = [parse_source_spec(d) if isinstance(d, str) else d for d in data]
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("data"), str) or not item["data"]:
            raise ConfigError(f"each data source needs a `data` (a file or a Hub id), got {item!r}")
    out = dict(tree)
    if len(items) == 1 and set(items[0]) == {"data"}:
        out["data"] = items[0]["data"]
        return out
    out["data"] = items[0]["data"]
    out["sources"] = [dict(item) for item in items]
    return out


@dataclass
class PrepareConfig:
    """`alpaca prepare`: records -> prompts -> tokens -> Levanter cache."""

    data: str = RECIPE_DATA
    """Hub dataset id, or a .json/.jsonl/.jsonl.gz file (local, gs://, any fsspec URL), or `demo`."""
    split: str = "train"
    """Split of a Hub dataset."""
    revision: Optional[str] = None
    """Revision (branch, tag or commit) of a Hub dataset."""
    instruction_field: str = "instruction"
    """Record field holding the instruction."""
    input_field: str = "input"
    """Record field holding the optional input."""
    output_field: str = "output"
    """Record field holding the response."""
    prompts: PromptTemplates = field(default_factory=PromptTemplates)
    """The templates; Stanford Alpaca's by default."""
    tokenizer: str = RECIPE_MODEL
    """Hub id or tokenizer folder (local or remote), or `demo`. [PAD] is added when it has no pad token."""
    max_length: int = 512
    """Longest example in tokens (prompt + response + EOS, or a rendered conversation; Stanford: 512)."""
    on_overflow: str = "truncate"
    """Longer examples: truncate (as Stanford), drop or error."""
    mask_inputs: bool = True
    """Alpaca records: mask the prompt tokens out of the loss (Stanford), or train on every token."""
    format: str = "auto"
    """The records: alpaca (instruction/input/output), messages ({role, content} lists) or sharegpt ({from, value}
    lists); auto tells them apart by their fields (one file holds one format)."""
    chat_template: Optional[str] = None
    """For conversations: a Jinja file (local or gs://), or a built-in: chatml, alpaca (Stanford's prompt, one turn).
    Default: the tokenizer's own chat template."""
    train_on: str = "all"
    """For conversations: which assistant turns are trained, all or the last."""
    messages_field: str = "messages"
    """Record field holding a conversation as a list of {role, content} messages."""
    conversations_field: str = "conversations"
    """Record field holding a ShareGPT conversation (a list of {from, value})."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: several sources in one cache (repeat --data SPEC,key=value, or a `data:` list in the config
    file). Empty: the one source of --data."""
    workers: Optional[int] = None
    """Processes that read and tokenize (the cache is the same for any number); 0: this process only. Default: the
    available cores (a source of at most 2 chunks, 8 MB of JSON Lines or 8,192 records, runs in this process;
    --ray-address uses the cluster instead)."""
    ray_address: Optional[str] = None
    """Tokenize on this existing Ray cluster (host:port, or `auto`: the one started on this machine) instead of this
    machine's cores; the same cache. Needs the ray extra here and on the cluster's nodes."""

    def __post_init__(self):
        problems, named = [], PREPARE_FLAGS.named
        problems += _source_problems(self.sources)
        if self.workers is not None and self.workers < 0:
            problems.append(f"{named('workers')} must be 0 (this process only) or more, got {self.workers}")
        if self.format not in RECORD_FORMATS:
            problems.append(f"{named('format')} must be one of {', '.join(RECORD_FORMATS)}, got {self.format!r}")
        if self.train_on not in TRAIN_ON:
            problems.append(f"{named('train_on')} must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.format == "alpaca" and (self.chat_template is not None or self.train_on != "all"):
            problems.append(f"{named('chat_template')} and {named('train_on')} apply to conversations; Alpaca records "
                            "are rendered with --prompts")
        if not 2 <= self.max_length <= MAX_LENGTH_LIMIT:
            problems.append(
                f"{named('max_length')} must be between 2 and {MAX_LENGTH_LIMIT:,} tokens, got {self.max_length:,}"
            )
        if self.on_overflow not in ON_OVERFLOW:
            problems.append(f"{named('on_overflow')} must be one of {', '.join(ON_OVERFLOW)}, got {self.on_overflow!r}")
        for name in ("instruction_field", "input_field", "output_field", "messages_field", "conversations_field"):
            if not getattr(self, name):
                problems.append(f"{named(name)} must not be empty")
        if problems:
            raise ConfigError(problems)

    def resolved_sources(self) -> list[ResolvedSource]:
        """The mixture's sources, each a full single-source PrepareConfig (keys left out take the top-level value);
        empty for a single-source config."""
        out = []
        for s in self.sources:
            given = {k: getattr(s, k) for k in SOURCE_KEYS
                     if k not in ("name", "weight", "epochs", "val_fraction", "prompts") and getattr(s, k) is not None}
            cfg = dataclasses.replace(self, sources=[], **given)
            out.append(ResolvedSource(s.label, s.weight, s.epochs, s.val_fraction, cfg, s.prompts))
        return out


def _source_problems(sources: list[SourceConfig]) -> list[str]:
    """A mixture's own checks: positive weights and epochs, one of the two (for every source or none), unique
    names, a held-out fraction in [0, 1)."""
    problems = []
    for s in sources:
        for key in ("weight", "epochs"):
            value = getattr(s, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                problems.append(f"source {s.label}: {key} must be a positive number, got {value}")
        if s.weight is not None and s.epochs is not None:
            problems.append(f"source {s.label}: give a weight or epochs, not both")
        if s.val_fraction is not None and not 0 <= s.val_fraction < 1:
            problems.append(f"source {s.label}: val_fraction must be in [0, 1), got {s.val_fraction}")
    for key in ("weight", "epochs"):
        having = [s.label for s in sources if getattr(s, key) is not None]
        if having and len(having) != len(sources):
            missing = [s.label for s in sources if getattr(s, key) is None]
            problems.append(f"source(s) {', '.join(missing)} have no {key} while {', '.join(having)} do: give "
                            f"every source a {key}, or none")
    names = [s.label for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"source name(s) {', '.join(twice)} are used twice: give each source a distinct name=")
    return problems


@dataclass
class ExportConfig:
    """`alpaca export`: Levanter checkpoint -> Hugging Face checkpoint, optionally on the Hub."""

    output: Optional[str] = None
    """Where to write the checkpoint (local or gs://). Default: RUN/hf."""
    step: Optional[int] = None
    """Export RUN/checkpoints/step-N instead of the final checkpoint."""
    dtype: Optional[str] = None
    """float32, bfloat16 or float16. Default: the base model's torch_dtype."""
    max_shard_size: str = "5GB"
    """Largest safetensors file, e.g. 5GB."""
    push_to_hub: bool = False
    """Upload the export to the Hugging Face Hub."""
    repo_id: Optional[str] = None
    """Hub repo. Default: <your user>/<run name>."""
    private: bool = False
    """Create the Hub repo private."""
    revision: Optional[str] = None
    """Branch to upload to (created if missing). Default: main."""
    commit_message: Optional[str] = None
    """Hub commit message."""
    adapter: bool = False
    """For a LoRA run: a PEFT adapter (adapter_config.json, adapter_model.safetensors) instead of the merged model."""
    verify: bool = False
    """Load the export with transformers (torch) and compare logits with Levanter's."""
    verify_examples: int = 4
    """How many prepared examples --verify compares."""
    verify_tolerance: Optional[float] = None
    """Largest allowed |logit difference|. Default: 1e-4 for float32 exports, 5e-2 for 16-bit ones."""
    overwrite: bool = False
    """Replace an earlier export of this run in the output folder (never other files: any other non-empty folder is
    refused)."""

    def __post_init__(self):
        problems, named = [], EXPORT_FLAGS.named
        if self.dtype is not None:
            self.dtype = EXPORT_DTYPE_ALIASES.get(self.dtype.lower(), self.dtype.lower())
        if self.dtype is not None and self.dtype not in EXPORT_DTYPES:
            problems.append(f"{named('dtype')} must be one of {', '.join(EXPORT_DTYPES)}, got {self.dtype!r}")
        if self.step is not None and self.step < 0:
            problems.append(f"{named('step')} must be >= 0, got {self.step}")
        if self.verify_examples < 1:
            problems.append(f"{named('verify_examples')} must be >= 1, got {self.verify_examples}")
        if self.verify_tolerance is not None and not (self.verify_tolerance > 0 and math.isfinite(self.verify_tolerance)):
            problems.append(f"{named('verify_tolerance')} must be a positive number, got {self.verify_tolerance}")
        if problems:
            raise ConfigError(problems)


PREPARE_FLAGS = Flags(
    PrepareConfig,
    Flag("data", help="Hub dataset id, or a .json/.jsonl/.jsonl.gz file (local, gs://, any fsspec URL), or `demo`. "
         "Repeat it for a mixture: SPEC,key=value,... with keys " + ", ".join(SOURCE_KEYS[:1] + SOURCE_KEYS[2:])
         + " (e.g. --data chat.jsonl,format=messages,weight=1).", type=list[str]),
    "split", "revision", "format", "instruction_field", "input_field", "output_field",
    "tokenizer", "chat_template", "train_on", "max_length", "on_overflow", "mask_inputs", "workers", "ray_address",
    set_example="messages_field=dialog",
)
EXPORT_FLAGS = Flags(
    ExportConfig, "output", "step", "dtype", "max_shard_size", "push_to_hub", "repo_id", "private", "revision",
    "commit_message", "adapter", "verify", "verify_tolerance", "overwrite", set_example="verify_examples=8",
)


# Stanford's recipe for Levanter's parts of the train config: batch 128, parameters in float32 with bfloat16 compute;
# AdamW(0.9, 0.999, 1e-8) (the Hugging Face Trainer's defaults), lr 2e-5, weight decay 0, warmup 3% of the steps,
# cosine decay to 0, gradient clipping at 1.0. `trainer.num_train_steps` 0 means "from `epochs`".
RECIPE_TRAINER: dict[str, Any] = {"train_batch_size": 128, "num_train_steps": 0, "mp": "p=f32,c=bfloat16", "seed": 0}
# The default learning rate with LoRA (lora_r > 0), QLoRA's for 7B/13B (alpaca-lora used 3e-4): adapters that start
# at zero barely move at full fine-tuning's rate.
LORA_LEARNING_RATE = 2e-4
RECIPE_OPTIMIZER: dict[str, Any] = {
    "learning_rate": 2e-5,
    "weight_decay": 0.0,
    "warmup": 0.03,
    "min_lr_ratio": 0.0,
    "lr_schedule": "cosine",
    "beta1": 0.9,
    "beta2": 0.999,
    "epsilon": 1e-8,
    "max_grad_norm": 1.0,
}
ATTENTION_BACKENDS = ("auto", "flash", "splash", "vanilla")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainOptions:
    """`alpaca train`'s own settings (train_config.TrainConfig adds Levanter's `trainer` and `optimizer`)."""

    model_name_or_path: str = RECIPE_MODEL
    """Base model: a Hub id, a local Hugging Face folder, or a gs:// folder (or `demo`, the built-in tiny Llama)."""
    seq_len: int = 2048
    """Row length in tokens (at most the model's context length)."""
    pack: bool = True
    """Pack several examples per row (attention kept per example), or pad one example per row."""
    epochs: float = 3.0
    """Passes over the prepared data (Stanford: 3). Ignored when steps are given (trainer.num_train_steps > 0)."""
    tensor_parallel: int = 1
    """Devices per tensor-parallel group (MLP and attention heads, kv heads included, are split over them)."""
    attention: str = "auto"
    """Attention kernel: auto (what is known to work with packed rows on the platform), flash (Levanter's JAX
    flash attention), splash (TPU Pallas kernel) or vanilla (plain softmax attention, memory quadratic in the row)."""
    attention_block: Optional[int] = None
    """Block size of flash/splash attention (rows must be a multiple of it). Default: chosen per platform and row."""
    remat: bool = True
    """Gradient checkpointing: recompute each layer in the backward pass (less memory; off is ~25% faster)."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (besides the time-based one and the final one)."""
    checkpoint_minutes: float = 10.0
    """Save a checkpoint at least this often, in minutes."""
    keep_checkpoints: int = 1
    """Keep the newest N complete checkpoints (older ones are deleted once a newer one is complete); 0 keeps all.
    The final checkpoint is the newest one."""
    max_segments_per_row: int = 64
    """Most examples packed into one row."""
    lora_r: int = 0
    """LoRA rank. 0 (the default) trains every weight; r > 0 trains rank-r adapters on lora_targets and freezes the
    base model (held in the compute dtype): a 7B model on one GPU, at LoRA's default learning rate."""
    lora_alpha: Optional[float] = None
    """LoRA scale numerator (the adapter's output is multiplied by alpha / r). Default: 2 x lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input (alpaca-lora's 0.05)."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get adapters (module names): attention and MLP."""
    val_fraction: float = 0.0
    """Hold out this fraction of the prepared examples and report their loss."""
    val_data: Optional[str] = None
    """A separate file of records for the held-out loss (prepared like the training data)."""
    eval_every: int = 100
    """Steps between held-out evaluations."""
    wandb_project: Optional[str] = None
    """Log to Weights & Biases under this project (WANDB_MODE=offline is honoured)."""
    tensorboard_dir: Optional[str] = None
    """Also write TensorBoard event files here (needs tensorboardX)."""
    prompts: Optional[PromptTemplates] = None
    """Accepted so that tutorial YAML files work; must equal the templates the run was prepared with."""

    def problems(self) -> list[str]:
        """What is wrong with these settings (the subclass adds the Levanter parts' problems and raises)."""
        p, named = [], TRAIN_FLAGS.named
        if self.seq_len < 8:
            p.append(f"{named('seq_len')} must be at least 8, got {self.seq_len}")
        if not math.isfinite(self.epochs) or self.epochs < 0:
            p.append(f"{named('epochs')} must be a positive number, got {self.epochs}")
        if self.tensor_parallel < 1:
            p.append(f"{named('tensor_parallel')} must be >= 1, got {self.tensor_parallel}")
        if self.attention not in ATTENTION_BACKENDS:
            p.append(f"{named('attention')} must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.attention_block is not None and self.attention_block < 1:
            p.append(f"{named('attention_block')} must be >= 1, got {self.attention_block}")
        if not 0.0 <= self.val_fraction < 1.0:
            p.append(f"{named('val_fraction')} must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_data:
            p.append("give val_fraction or val_data, not both")
        if self.checkpoint_every < 1:
            p.append(f"{named('checkpoint_every')} must be >= 1, got {self.checkpoint_every}")
        if not math.isfinite(self.checkpoint_minutes) or self.checkpoint_minutes <= 0:
            p.append(f"{named('checkpoint_minutes')} must be > 0, got {self.checkpoint_minutes}")
        if self.keep_checkpoints < 0:
            p.append(f"{named('keep_checkpoints')} must be >= 0, got {self.keep_checkpoints}")
        if self.max_segments_per_row < 1:
            p.append(f"{named('max_segments_per_row')} must be >= 1, got {self.max_segments_per_row}")
        if self.eval_every < 1:
            p.append(f"{named('eval_every')} must be >= 1, got {self.eval_every}")
        if self.lora_r < 0:
            p.append(f"{named('lora_r')} must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            p.append(f"{named('lora_alpha')} must be a positive number, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"{named('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not self.lora_targets:
            p.append(f"{named('lora_targets')} names no module")
        return p

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    @property
    def lora_scale_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r


TRAIN_FLAGS = Flags(
    TrainOptions,
    Flag("model_name_or_path", "--model"),
    "epochs",
    Flag("trainer.num_train_steps", "--steps", "Optimizer steps; overrides --epochs.", int, min=1, show_default=False),
    Flag("trainer.train_batch_size", "--batch-size", "Examples per optimizer step (packed rows are derived from it).",
         int, min=1),
    Flag("optimizer.learning_rate", help=f"Peak learning rate (with --lora-r: {short_number(LORA_LEARNING_RATE)}).",
         type=float),
    Flag("optimizer.weight_decay", help="AdamW weight decay.", type=float),
    Flag("optimizer.warmup", help="Warmup as a fraction of the steps.", type=float),
    Flag("optimizer.lr_schedule", help="cosine, linear or constant.", type=str),
    Flag("trainer.mp", "--precision", "Mixed precision policy, e.g. p=f32,c=bfloat16 or p=f32,c=f32.", str),
    "seq_len",
    "pack",
    "tensor_parallel",
    Flag("trainer.per_device_parallelism", "--per-device-rows",
         "Rows per device per forward pass; fewer than the step's share means gradient accumulation.", int),
    "attention",
    "attention_block",
    "remat",
    Flag("lora_r", min=0),
    "lora_alpha",
    "lora_dropout",
    Flag("lora_targets", help="Comma-separated module names that get adapters, e.g. q_proj,v_proj.", type=str,
         parse=comma_list),
    "checkpoint_every",
    "checkpoint_minutes",
    "keep_checkpoints",
    "val_fraction",
    "val_data",
    "eval_every",
    Flag("trainer.seed", help="Seed for shuffling.", type=int),
    "wandb_project",
    "tensorboard_dir",
    set_example="optimizer.beta2=0.95",
)


@dataclass
class Decoding:
    """How `alpaca generate` decodes (`alpaca eval` decodes greedily with its own max_new_tokens and batch_size)."""

    max_new_tokens: int = 256
    """Most tokens per answer."""
    temperature: float = 0.0
    """0 is greedy; higher samples more freely."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability."""
    seed: int = 0
    """Sampling seed (each request's answer depends only on it and the request)."""
    batch_size: int = 8
    """Requests decoded together."""

    def __post_init__(self):
        problems, flag = [], GENERATE_FLAGS.flag_for
        if self.max_new_tokens < 1:
            problems.append(f"{flag('max_new_tokens')} must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            problems.append(f"{flag('temperature')} must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"{flag('top_p')} must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            problems.append(f"{flag('batch_size')} must be >= 1, got {self.batch_size}")
        if problems:
            raise ConfigError(problems)


ALPACA_EVAL = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 2048}
"""The decoding AlpacaEval's alpaca-7b entry used (its configs: temperature 0.7, top_p 1.0, max_new_tokens 2048)."""


@dataclass
class GenerateConfig(Decoding):
    """`alpaca generate`: the decoding of its answers, and the conversations it answers."""

    alpaca_eval: bool = False
    """AlpacaEval's alpaca-7b decoding (ALPACA_EVAL) as the defaults; what is given beside it wins."""
    messages: Optional[str] = None
    """A JSON file of one conversation (a list of {role, content}), or a .json/.jsonl of conversations: each is
    rendered with the run's chat template and its next assistant turn answered (a final assistant message is kept
    as the reference)."""


def generate_derived_defaults(given: dict) -> dict:
    """Defaults that depend on what the user gave (load_config's derived_defaults): AlpacaEval's decoding."""
    return dict(ALPACA_EVAL) if given.get("alpaca_eval") is True else {}


GENERATE_FLAGS = Flags(
    GenerateConfig, "max_new_tokens", "temperature", "top_p", "seed", "batch_size",
    Flag("alpaca_eval", help="AlpacaEval's alpaca-7b decoding: " + ", ".join(f"{k} {v:,}" for k, v in ALPACA_EVAL.items())
         + " (flags, --set and --config given beside it win)."),
    Flag("messages", show_default=False),
    set_example="temperature=0.7",
)


@dataclass
class EvalConfig:
    """`alpaca eval`: how the held-out records are scored (greedy answers, as generate's defaults)."""

    max_new_tokens: int = Decoding.max_new_tokens
    """Tokens an answer may take before it counts as not stopping."""
    batch_size: int = Decoding.batch_size
    """Examples scored together."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            flag = EVAL_FLAGS.flag_for
            raise ConfigError(f"{flag('max_new_tokens')} and {flag('batch_size')} must be at least 1")


EVAL_FLAGS = Flags(EvalConfig, "max_new_tokens", "batch_size", set_example="max_new_tokens=512")


def default_text(cls: type, key: str) -> str:
    """`Default: X.` for a config key, read from the one place the default lives (for help texts)."""
    value = default_value(cls, key)
    if value is None:
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, list):
        value = ",".join(map(str, value))
    return f"Default: {value}."


def help_text(flags: Flags, f: Flag) -> str:
    """A flag's help: what it does (the field's docstring, or the table's words), its default and its config key."""
    text = f.help or field_doc(flags.cls, f.key)
    default = default_text(flags.cls, f.key) if f.show_default else ""
    if default == "Default: off.":  # a flag that is off unless given
        default = ""
    return " ".join(p for p in (text, default, f"Config key: {f.key}.") if p)


def field_doc(cls: type, name: str) -> str:
    """A dataclass field's docstring, on one line (draccus reads it from the source, as for its own --help)."""
    from draccus.wrappers.docstring import get_attribute_docstring

    doc = get_attribute_docstring(cls, name).docstring_below
    if not doc:
        raise AssertionError(f"{cls.__name__}.{name} has no docstring: it is the flag's help")
    return " ".join(doc.split())


def field_type(cls: type, key: str) -> type:
    """The type of a config key's value, Optional[...] unwrapped (the recipe's type for Levanter's keys)."""
    head, _, rest = key.partition(".")
    if rest:
        return type(default_value(cls, key))
    hint = typing.get_type_hints(cls)[head]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def default_value(cls: type, key: str) -> Any:
    """The default of a (dotted) config key of PrepareConfig, ExportConfig or TrainOptions (`trainer.` and
    `optimizer.` keys come from the recipe tables)."""
    head, _, rest = key.partition(".")
    if cls is TrainOptions and head == "trainer":
        return RECIPE_TRAINER.get(rest)
    if cls is TrainOptions and head == "optimizer":
        return RECIPE_OPTIMIZER.get(rest)
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return default_value(type(value), rest) if rest else value


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


def _lookup(tree: Mapping | None, key: str) -> Any:
    """The value at a dotted key of a nested mapping, None when there is none."""
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def parse_set(items: Sequence[str] | None, defaults: Mapping | None = None) -> dict:
    """`--set a.b=v` items -> nested dict; values are YAML (so 1e-5, true, [a, b] work).

    With `defaults` (the config's default tree), a value given for a whole section (`--set trainer=5`) is refused:
    merged, it would replace every key of the section with its class default."""
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
        section = _lookup(defaults, key.strip())
        if isinstance(section, Mapping) and section and not isinstance(value, Mapping):
            example = "seed" if "seed" in section else next(iter(section))
            problems.append(f"--set {item}: `{key.strip()}` is a section of settings, not one value; set a key in "
                            f"it, e.g. --set {key.strip()}.{example}={raw}")
            continue
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
        raise ConfigError(f"{what} {path} is not valid YAML or JSON: {first_line(e, None)}") from None


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
    derived_defaults: Callable[[dict], dict] | None = None,
    adapt: Callable[[dict], dict] | None = None,
) -> T:
    """Resolve cls from defaults < config file < --set < typed flags (dotted keys; None means not given).

    The layers are merged as trees and decoded once with draccus, rather than through `draccus.parse(cls,
    config_path, args)`: the config file may be remote (gs://) and may be Levanter's tutorial format (adapted by
    `file_adapter` first), `--set` values are YAML (`1e-5`, `[a, b]`, `null`), typed flags arrive as Python values
    (no round trip through argv strings), and a choice type such as `optimizer.type` replaces its whole subtree when it
    changes. Decoding still goes through draccus, which rejects unknown keys and checks types.

    `derived_defaults(given)` returns defaults that depend on what was given (the merged file, --set and flags):
    they replace the class's defaults and lose, like them, to anything given (LoRA's learning rate, say).
    `adapt(tree)` reshapes the merged tree before it is decoded (prepare: a list of data sources).
    """
    import draccus

    tree = draccus.encode(cls())
    layers: list = []
    if config_path:
        file_tree = read_config_file(config_path)
        if file_adapter is not None:
            file_tree = file_adapter(file_tree)
        layers.append(file_tree)
    layers.append(parse_set(set_items, defaults=tree))
    for key, value in (flags or {}).items():
        if value is not None:
            override: dict = {}
            _set_dotted(override, key, value)
            layers.append(override)
    if derived_defaults is not None:
        given: dict = {}
        for layer in layers:
            given = _merge(given, layer)
        tree = _merge(tree, derived_defaults(given))
    for layer in layers:
        tree = _merge(tree, layer)
    if adapt is not None:
        tree = adapt(tree)
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
