"""Typed records of the run's stages: what `manifest.json` holds, and what the stages hand each other.

`RunDir` (rundir.py) reads and writes them; nothing else reads the manifest. A record is a dataclass; the manifest
is their JSON encoding (draccus), so an unknown or missing field is an error, not a silent `None`. Bump
`SCHEMA_VERSION` when a record changes shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from alpaca_cli.config import ExportConfig, PrepareConfig, source_name

SCHEMA_VERSION = 2

RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"


@dataclass
class Writer:
    """The process that ran the stage (process 0 of N on a pod): where to look if it is still running."""

    host: str = ""
    pid: int = 0
    process_index: int = 0
    process_count: int = 1


@dataclass
class StageRecord:
    """What every stage records: its state, when, by whom, with which versions."""

    status: str = RUNNING
    started: Optional[str] = None
    finished: Optional[str] = None
    heartbeat: Optional[str] = None
    """Last sign of life of a running stage (UTC, ISO 8601); `alpaca status` tells a live stage from a dead one."""
    error: Optional[str] = None
    writer: Writer = field(default_factory=Writer)
    versions: dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE


# -- prepare ---------------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """What identifies the prepared data: a file's bytes, or a Hub dataset's commit."""

    kind: str = "file"
    """file or hub."""
    sha256: Optional[str] = None
    bytes: Optional[int] = None
    id: Optional[str] = None
    revision: Optional[str] = None
    split: Optional[str] = None


@dataclass
class PrepareInputs:
    data: DataSource = field(default_factory=DataSource)
    tokenizer: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    """Everything the fingerprint covers, by name (to say what differs when inputs change)."""


@dataclass
class PrepareSummary:
    records_read: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    vocab_size: int = 0
    added_tokens: dict[str, str] = field(default_factory=dict)
    """Special tokens prepare added because the tokenizer lacked them (e.g. {"pad_token": "[PAD]"})."""


@dataclass
class SourceRecord:
    """One source of a mixture as prepared: what it was, its settings, and the cache rows it holds."""

    name: str = ""
    data: DataSource = field(default_factory=DataSource)
    where: str = ""
    """--data as given for it."""
    format: str = "alpaca"
    chat_template: Optional[str] = None
    """For conversations: the template's Jinja text exactly as used."""
    weight: Optional[float] = None
    epochs: Optional[float] = None
    val_fraction: Optional[float] = None
    rows: list[int] = field(default_factory=lambda: [0, 0])
    """[start, stop): its examples' rows in the cache (the sources follow each other in config order)."""
    records_read: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class PrepareRecord(StageRecord):
    config: PrepareConfig = field(default_factory=PrepareConfig)
    inputs: PrepareInputs = field(default_factory=PrepareInputs)
    fingerprint: str = ""
    summary: Optional[PrepareSummary] = None
    format: str = "alpaca"
    """The records as read: alpaca, messages or sharegpt (--format, or what auto found)."""
    chat_template: Optional[str] = None
    """For conversations: the Jinja text of the chat template the cache was rendered with, exactly as used (what
    export ships and generate renders with). None for Alpaca records (their prompts are in the config)."""
    sources: list[SourceRecord] = field(default_factory=list)
    """A mixture's sources, in cache order. Empty for one source (all rows are its records)."""

    def source_list(self) -> list[SourceRecord]:
        """The sources, a single-source run's one included (named after its data, over every row)."""
        if self.sources:
            return list(self.sources)
        s = self.summary
        return [SourceRecord(name=source_name(self.config.data), data=self.inputs.data, where=self.config.data,
                             format=self.format, chat_template=self.chat_template, rows=[0, s.examples if s else 0],
                             records_read=s.records_read if s else 0, examples=s.examples if s else 0,
                             tokens=s.tokens if s else 0, trained_tokens=s.trained_tokens if s else 0)]


# -- train -----------------------------------------------------------------------------------------------------------


@dataclass
class MeshShape:
    data_parallel_fsdp: int = 1
    tensor_parallel: int = 1


@dataclass
class OptimizerSummary:
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.0
    lr_schedule: str = ""


@dataclass
class MemoryEstimate:
    """GiB per device."""

    model_and_optimizer: float = 0.0
    activations_estimate: float = 0.0


@dataclass
class CompiledMemory:
    """What XLA says one device holds in the compiled training step (GiB), and what that means for the target."""

    arguments: float = 0.0
    outputs: float = 0.0
    aliased: float = 0.0
    """Outputs written in place of (donated) arguments: the new state reuses the old one's memory."""
    temporaries: float = 0.0
    total: float = 0.0
    """arguments + outputs - aliased + temporaries, on XLA:CPU (an over-estimate for accelerators)."""
    cpu_upcast: float = 0.0
    """Of the temporaries: float32 copies of 16-bit weights that only XLA:CPU makes (not on TPUs and GPUs)."""
    accelerator_total: float = 0.0
    """total - cpu_upcast: the figure the verdict judges."""
    target_memory: float = 0.0
    target_usable: float = 0.0
    verdict: str = ""
    """fits, borderline or does not fit (with the margins of docs/planning.md)."""
    verdict_text: str = ""
    refused: bool = False
    """XLA:TPU refused to place the step in the chip's memory: `total` is the least it said the step needs, and
    there is no breakdown (arguments, outputs and temporaries are 0)."""


@dataclass
class CompiledPlan:
    target: str = ""
    compiler: str = "XLA:CPU"
    """XLA:TPU (the TPU's own compiler, deviceless: exact figures) or XLA:CPU (simulated devices: an estimate)."""
    compiled_by: str = ""
    """The same in words: "compiled by XLA:TPU for v4-8 (2x2x1), deviceless" or "estimated with XLA:CPU ..."."""
    memory_per_device_gib: CompiledMemory = field(default_factory=CompiledMemory)
    compiled_flops_per_step: float = 0.0
    """Matrix-product FLOPs of the compiled step, all devices (recomputation for remat included)."""
    model_flops_per_step: float = 0.0
    """6 x parameters x tokens + attention: what MFU counts."""
    step_seconds_at_40_mfu: float = 0.0
    step_seconds_at_60_mfu: float = 0.0
    epoch_hours_at_40_mfu: float = 0.0
    epoch_hours_at_60_mfu: float = 0.0
    compile_seconds: float = 0.0


@dataclass
class PlanSource:
    """What the plan draws from one source of a mixture."""

    name: str = ""
    train_examples: int = 0
    """The source's examples that are not held out."""
    examples: int = 0
    """Examples the plan's steps take from it (repeats counted)."""
    epochs: float = 0.0
    """Passes over its training examples."""
    share_examples: float = 0.0
    share_trained: float = 0.0
    """Its share of the plan's trained tokens."""


@dataclass
class PlanRecord:
    """The training plan as `--dry-run` prints it and the manifest keeps it."""

    model: str = ""
    model_type: str = ""
    parameters: int = 0
    devices: int = 1
    hosts: int = 1
    platform: str = "cpu"
    mesh: MeshShape = field(default_factory=MeshShape)
    seq_len: int = 0
    pack: bool = True
    batch_size_examples: int = 0
    rows_per_step: int = 0
    """The plan's rows per step, the same on every machine."""
    rows_per_batch: int = 0
    """Rows of a step's batch on this mesh: rows_per_step, then empty rows up to a multiple of the row slots."""
    examples_per_step: float = 0.0
    steps: int = 0
    epochs: float = 0.0
    train_examples: int = 0
    val_examples: int = 0
    trained_tokens: int = 0
    real_tokens: int = 0
    padding_fraction: float = 0.0
    precision: str = ""
    attention: str = ""
    """The attention kernel: flash, splash or vanilla."""
    attention_block: Optional[int] = None
    remat: bool = True
    lora_r: int = 0
    trainable_parameters: int = 0
    """Parameters the optimizer updates: all of them, or the adapters' with LoRA."""
    optimizer: OptimizerSummary = field(default_factory=OptimizerSummary)
    memory_per_device_gib: MemoryEstimate = field(default_factory=MemoryEstimate)
    compiled: Optional[CompiledPlan] = None
    """With --target: the compiled step's memory, FLOPs and times on that machine."""
    resumes: Optional[str] = None
    """Where the run directory holds a checkpoint this plan resumes from: which step, and the machine it was written
    on against this one."""
    sources: list[PlanSource] = field(default_factory=list)
    """A mixture's sources as the plan samples them (empty for one source)."""


@dataclass
class LoraRecord:
    """The adapters a LoRA run trains (export and generate rebuild them to load its checkpoints)."""

    r: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)


@dataclass
class TrainInputs:
    prepared: str = ""
    """The prepare stage's fingerprint."""
    model: str = ""
    """--model as given (Hub id, folder, gs:// folder or `demo`)."""


@dataclass
class TrainProgress:
    step: int = 0
    total_steps: int = 0
    loss: Optional[float] = None
    last_checkpoint: Optional[str] = None


@dataclass
class TrainSegment:
    """Steps a run trained on one machine: a resume on another device count, host count or tensor-parallel size (or
    the same again) starts a new segment."""

    start_step: int = 0
    """Updates done when the segment started (0, or the resumed checkpoint's)."""
    end_step: int = 0
    """Updates done when it last reported (the run's progress while it runs)."""
    devices: int = 1
    hosts: int = 1
    tensor_parallel: int = 1
    platform: str = ""
    started: str = ""


@dataclass
class TrainSummary:
    steps: int = 0
    final_loss: Optional[float] = None


@dataclass
class TrainRecord(StageRecord):
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved TrainConfig, encoded (as configs/train.yaml); for people, not read back by code."""
    inputs: TrainInputs = field(default_factory=TrainInputs)
    plan: Optional[PlanRecord] = None
    plan_fingerprint: Optional[str] = None
    plan_inputs: Optional[dict[str, Any]] = None
    """What decided the plan (core/train_setup.plan_inputs): a resume that changes one is refused, naming it."""
    segments: list[TrainSegment] = field(default_factory=list)
    """The machines the run trained on, in order (alpaca status shows them)."""
    vocab_trained: Optional[int] = None
    """Rows of the trained embedding matrix (the tokenizer's size, padded for sharding)."""
    lora: Optional[LoraRecord] = None
    """Set for a LoRA run: its checkpoints hold the adapters (and their optimizer state) only."""
    progress: Optional[TrainProgress] = None
    final_checkpoint: Optional[str] = None
    """Relative to the run directory."""
    summary: Optional[TrainSummary] = None


# -- export ----------------------------------------------------------------------------------------------------------


@dataclass
class ExportOutputs:
    export_dir: str = ""
    """Relative to the run directory when inside it."""
    dtype: str = ""
    step: int = 0
    files: list[str] = field(default_factory=list)
    repo_id: Optional[str] = None
    repo_url: Optional[str] = None
    commit: Optional[str] = None
    revision: Optional[str] = None


@dataclass
class ExportSummary:
    """What the export measured; the verify_* fields are set by --verify."""

    weight_bytes: int = 0
    peak_rss_bytes: int = 0
    verify_max_abs_diff: Optional[float] = None
    verify_tolerance: Optional[float] = None
    verify_examples: Optional[int] = None
    verify_tokens: Optional[int] = None
    verify_loss: Optional[float] = None
    """transformers' loss on the verified examples' trained tokens."""
    verify_levanter_loss: Optional[float] = None
    """Levanter's loss on the same tokens (the model rounded to the export's dtype)."""
    verify_eos_stop_rate: Optional[float] = None
    """Share of the verified examples' prompts whose greedy answer ended with EOS (None: no prompts to answer)."""
    verify_eos_stopped: Optional[int] = None
    verify_eos_max_new_tokens: Optional[int] = None


@dataclass
class ExportRecord(StageRecord):
    config: ExportConfig = field(default_factory=ExportConfig)
    checkpoint: str = ""
    """The exported checkpoint, relative to the run directory."""
    step: int = 0
    outputs: Optional[ExportOutputs] = None
    summary: Optional[ExportSummary] = None


# -- eval ------------------------------------------------------------------------------------------------------------


@dataclass
class EvalScore:
    model: str = ""
    """What was scored: `step-N` of the run, `base` (the base model as training started from it), or an export."""
    examples: int = 0
    trained_tokens: int = 0
    loss: float = 0.0
    """Mean next-token loss over the held-out records' trained tokens (Stanford's labels)."""
    perplexity: float = 0.0
    eos_stop_rate: float = 0.0
    """Share of prompts whose greedy answer ended with the EOS token within max_new_tokens."""
    eos_stopped: int = 0
    prompts: int = 0
    max_new_tokens: int = 0


@dataclass
class EvalRecord(StageRecord):
    data: str = ""
    source: DataSource = field(default_factory=DataSource)
    scores: list[EvalScore] = field(default_factory=list)


RECORD_TYPES: dict[str, type[StageRecord]] = {
    "prepare": PrepareRecord, "train": TrainRecord, "export": ExportRecord, "eval": EvalRecord,
}
STAGES = tuple(RECORD_TYPES)
