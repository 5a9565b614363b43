"""TrainConfig: `alpaca train`'s configuration, in the format of Levanter's examples/alpaca/alpaca.yaml.

A tutorial file (`model_name_or_path`, `trainer.*`, `optimizer.*`, `prompts`) works as it is. Two of the trainer's
keys keep the tutorial's meaning, which counts examples: `trainer.train_batch_size` is the number of *examples* per
optimizer step (the rows per step are derived from it when packing), and `trainer.num_train_steps` is the number of
steps (0 = derive from `epochs`). Keys that the run directory owns (checkpoint paths, run id, log dir) are set by
alpaca and may not be given.

This module imports Levanter (and so JAX): commands import it inside their bodies. Its defaults come from
config.py, which help texts read without importing JAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jmp
from levanter.optim import AdamConfig, OptimizerConfig
from levanter.trainer import TrainerConfig

from alpaca_cli.config import (
    LORA_LEARNING_RATE,
    PREPARE_FLAGS,
    RECIPE_OPTIMIZER,
    RECIPE_TRAINER,
    TRAIN_FLAGS,
    TrainOptions,
)
from alpaca_cli.errors import ConfigError


def _recipe_trainer() -> TrainerConfig:
    return TrainerConfig(**{**RECIPE_TRAINER, "mp": jmp.get_policy(RECIPE_TRAINER["mp"])})


def _recipe_optimizer() -> OptimizerConfig:
    return AdamConfig(**RECIPE_OPTIMIZER)


def derived_defaults(given: dict) -> dict:
    """Defaults that depend on what the user gave (config.load_config's derived_defaults): LoRA's learning rate."""
    lora_r = given.get("lora_r")
    if isinstance(lora_r, int) and lora_r > 0:
        return {"optimizer": {"learning_rate": LORA_LEARNING_RATE}}
    return {}


@dataclass
class TrainConfig(TrainOptions):
    """`alpaca train`: full fine-tuning of a Hugging Face causal LM on the prepared cache."""

    trainer: TrainerConfig = field(default_factory=_recipe_trainer)
    optimizer: OptimizerConfig = field(default_factory=_recipe_optimizer)

    def __post_init__(self):
        problems, named = self.problems(), TRAIN_FLAGS.named
        tc, opt = self.trainer, self.optimizer
        if self.epochs <= 0 and tc.num_train_steps <= 0:
            problems.append("give epochs > 0 or trainer.num_train_steps > 0")
        if tc.num_train_steps < 0:
            problems.append(f"{named('trainer.num_train_steps')} must be >= 0, got {tc.num_train_steps}")
        if not isinstance(tc.train_batch_size, int) or tc.train_batch_size < 1:
            problems.append(
                f"batch size ({TRAIN_FLAGS.flag_for('trainer.train_batch_size')}, trainer.train_batch_size) must be a "
                f"positive integer, "
                f"got {tc.train_batch_size}"
            )
        pdp = tc.per_device_parallelism
        if pdp is not None and pdp != -1 and pdp < 1:
            problems.append(f"{named('trainer.per_device_parallelism')} must be >= 1, got {pdp}")
        for key, value, low, high in (
            ("optimizer.learning_rate", opt.learning_rate, 0.0, None),
            ("optimizer.weight_decay", opt.weight_decay, 0.0, None),
            ("optimizer.min_lr_ratio", opt.min_lr_ratio, 0.0, 1.0),
            ("optimizer.max_grad_norm", opt.max_grad_norm, 0.0, None),
        ):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
                high is not None and value > high
            ):
                bound = f"between {low} and {high}" if high is not None else f"a finite number >= {low}"
                problems.append(f"{named(key)} must be {bound}, got {value}")
        if isinstance(opt.learning_rate, (int, float)) and opt.learning_rate == 0:
            problems.append(f"{named('optimizer.learning_rate')} is 0: nothing would be learned")
        warmup = opt.warmup
        if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
            problems.append(f"{named('optimizer.warmup')} as a fraction must be in [0, 1), got {warmup}")
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
    prepare` owns are refused with a pointer to it. The tutorial was written for the standalone Levanter: its
    `trainer.tensor_parallel_axes` and `trainer.model_axis_size` are `trainer.mesh.shared_mapping` (those axes on
    the "model" mesh axis) and `trainer.mesh.axes.model` in marin-levanter's TrainerConfig.
    """
    tree = dict(tree)
    trainer = dict(tree.get("trainer") or {})
    wandb = trainer.pop("wandb", None)
    if isinstance(wandb, dict) and wandb.get("project") and not tree.get("wandb_project"):
        tree["wandb_project"] = wandb["project"]
    tp_axes, tp_size = trainer.pop("tensor_parallel_axes", None), trainer.pop("model_axis_size", None)
    if tp_axes or tp_size:
        mesh = dict(trainer.get("mesh") or {})
        if tp_axes:
            mesh["shared_mapping"] = {**{a: "model" for a in tp_axes}, **(mesh.get("shared_mapping") or {})}
        if tp_size:
            mesh["axes"] = {**(mesh.get("axes") or {}), "model": tp_size}
        trainer["mesh"] = mesh
    if trainer or "trainer" in tree:
        tree["trainer"] = trainer
    owned_by_prepare = [k for k in ("data", "data_cache_dir", "max_tune_length", "mask_inputs") if k in tree]
    if owned_by_prepare:
        flags = f"{PREPARE_FLAGS['data'].flag}, {PREPARE_FLAGS['max_length'].flag}, {PREPARE_FLAGS['mask_inputs'].off}"
        raise ConfigError(
            f"config key(s) {', '.join(owned_by_prepare)} belong to `alpaca prepare` "
            f"(flags {flags}); remove them from the train config"
        )
    return tree
