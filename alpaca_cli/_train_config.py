"""TrainConfig: `alpaca train`'s configuration, in the format of Levanter's examples/alpaca/alpaca.yaml.

A tutorial file (`model_name_or_path`, `trainer.*`, `optimizer.*`, `prompts`) works as it is. Two of the trainer's
keys keep the tutorial's meaning, which counts examples: `trainer.train_batch_size` is the number of *examples* per
optimizer step (the rows per step are derived from it when packing), and `trainer.num_train_steps` is the number of
steps (0 = derive from `epochs`). Keys that the run directory owns (checkpoint paths, run id, log dir) are set by
alpaca and may not be given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import jmp
from levanter.optim import AdamConfig, OptimizerConfig
from levanter.trainer import TrainerConfig

from alpaca_cli.config import RECIPE_MODEL, PromptTemplates
from alpaca_cli.errors import ConfigError


def _recipe_trainer() -> TrainerConfig:
    # Stanford's recipe: batch 128, parameters in float32 with bfloat16 compute.
    return TrainerConfig(
        train_batch_size=128,
        num_train_steps=0,
        mp=jmp.get_policy("p=f32,c=bfloat16"),
        seed=0,
    )


def _recipe_optimizer() -> OptimizerConfig:
    # Stanford's recipe (Hugging Face Trainer defaults + their flags): AdamW(0.9, 0.999, 1e-8), lr 2e-5,
    # weight decay 0, warmup 3% of the steps, cosine decay to 0, gradient clipping at 1.0.
    return AdamConfig(
        learning_rate=2e-5,
        weight_decay=0.0,
        warmup=0.03,
        min_lr_ratio=0.0,
        lr_schedule="cosine",
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        max_grad_norm=1.0,
    )


@dataclass
class TrainConfig:
    """`alpaca train`: full fine-tuning of a Hugging Face causal LM on the prepared cache."""

    model_name_or_path: str = RECIPE_MODEL
    """Base model: a Hub id, a local Hugging Face folder, or a gs:// folder (or `demo`, the built-in tiny Llama)."""
    seq_len: int = 2048
    """Row length in tokens (at most the model's context length)."""
    pack: bool = True
    """Pack several examples per row, attention kept per example. False pads one example per row."""
    epochs: float = 3.0
    """Passes over the prepared data (Stanford: 3). Ignored when trainer.num_train_steps > 0."""
    tensor_parallel: int = 1
    """Devices per tensor-parallel group (MLP and attention heads, kv heads included, are split over them)."""
    checkpoint_every: int = 500
    """Keep a checkpoint every N steps (besides the time-based one and the final one)."""
    checkpoint_minutes: float = 10.0
    """Save a (temporary) checkpoint at least this often, in minutes."""
    max_segments_per_row: int = 64
    """Most examples packed into one row."""
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
    trainer: TrainerConfig = field(default_factory=_recipe_trainer)
    optimizer: OptimizerConfig = field(default_factory=_recipe_optimizer)

    def __post_init__(self):
        problems = []
        if self.seq_len < 8:
            problems.append(f"seq_len must be at least 8, got {self.seq_len}")
        if self.epochs <= 0 and self.trainer.num_train_steps <= 0:
            problems.append("give epochs > 0 or trainer.num_train_steps > 0")
        if self.trainer.num_train_steps < 0:
            problems.append(f"trainer.num_train_steps must be >= 0, got {self.trainer.num_train_steps}")
        if not isinstance(self.trainer.train_batch_size, int) or self.trainer.train_batch_size < 1:
            problems.append(f"batch size (trainer.train_batch_size) must be a positive integer, got {self.trainer.train_batch_size}")
        if self.tensor_parallel < 1:
            problems.append(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_data:
            problems.append("give val_fraction or val_data, not both")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.max_segments_per_row < 1:
            problems.append(f"max_segments_per_row must be >= 1, got {self.max_segments_per_row}")
        warmup = self.optimizer.warmup
        if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
            problems.append(f"optimizer.warmup as a fraction must be in [0, 1), got {warmup}")
        tc = self.trainer
        owned = {
            "trainer.id": tc.id is not None,
            "trainer.load_checkpoint_path": tc.load_checkpoint_path is not None,
            "trainer.initialize_from": tc.initialize_from is not None,
        }
        for key, given in owned.items():
            if given:
                problems.append(f"{key} is set by alpaca from the run directory; remove it from the config")
        if problems:
            raise ConfigError(problems)

    @property
    def batch_size(self) -> int:
        """Examples per optimizer step."""
        return int(self.trainer.train_batch_size)

    @property
    def steps(self) -> int | None:
        return self.trainer.num_train_steps or None


def adapt_tutorial_yaml(tree: dict) -> dict:
    """Accept Levanter's tutorial alpaca.yaml as it is.

    `trainer.wandb` (deprecated in Levanter) becomes our `wandb_project`; the tutorial's data keys that `alpaca
    prepare` owns are refused with a pointer to it.
    """
    tree = dict(tree)
    trainer = dict(tree.get("trainer") or {})
    wandb = trainer.pop("wandb", None)
    if isinstance(wandb, dict) and wandb.get("project") and not tree.get("wandb_project"):
        tree["wandb_project"] = wandb["project"]
    if trainer or "trainer" in tree:
        tree["trainer"] = trainer
    owned_by_prepare = [k for k in ("data", "data_cache_dir", "max_tune_length", "mask_inputs") if k in tree]
    if owned_by_prepare:
        raise ConfigError(
            f"config key(s) {', '.join(owned_by_prepare)} belong to `alpaca prepare` "
            f"(flags --data, --max-length, --no-mask-inputs); remove them from the train config"
        )
    return tree
