"""Levanter's TrainerConfig for a run: the plan's batches and steps, the mesh (tensor parallelism on the "model" axis),
checkpoints in the run directory, the resume point, and the trackers (W&B, TensorBoard)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from pathlib import Path

from alpaca_cli.errors import ConfigError
from alpaca_cli.rundir import RunDir

TP_AXES = ["mlp", "heads", "kv_head"]  # Levanter's names: MLP hidden, attention heads, and (GQA) kv heads


def trainer_config(cfg, run: RunDir, layout, log_dir: str, trackers, resume: str | None = None):
    """layout: core/train_setup.Layout (the plan and its batches on this mesh)."""
    from levanter.checkpoint import CheckpointerConfig
    from levanter.distributed import DistributedConfig

    tc = cfg.trainer
    mesh = tc.mesh
    if cfg.tensor_parallel > 1:  # TP_AXES on the "model" mesh axis (a mapping the config gives for one wins)
        mesh = dataclasses.replace(
            mesh, axes={**mesh.axes, "model": cfg.tensor_parallel},
            shared_mapping={**{a: "model" for a in TP_AXES}, **mesh.shared_mapping})
    return dataclasses.replace(
        tc,
        id=run.name,
        # Levanter's train_batch_size counts what it stacks into a batch: our packed rows (the plan's, and the empty
        # ones this mesh needs). Ours (the config key, in the tutorial's meaning) counted examples.
        train_batch_size=layout.rows_per_batch,
        num_train_steps=layout.plan.steps,
        mesh=mesh,
        checkpointer=CheckpointerConfig(
            base_path=run.checkpoints_dir,
            save_interval=datetime.timedelta(minutes=cfg.checkpoint_minutes),
            keep=[dict(every=cfg.checkpoint_every)],
            append_run_id_to_base_path=False,
        ),
        # the checkpoint to resume from, as checked by resume_point (not Levanter's discovery, which takes any
        # folder with a metadata.json for the newest); None: start from the base model
        load_checkpoint_path=resume,
        load_checkpoint=resume is not None,
        log_dir=Path(log_dir),
        tracker=trackers,
        require_accelerator=False,
        distributed=DistributedConfig(initialize_jax_distributed=False),  # done by distributed.initialize()
        log_jaxprs=False,
        log_xla_hlo=False,
        steps_per_eval=cfg.eval_every,
    )


def check_tracker_packages(cfg) -> None:
    if cfg.tensorboard_dir:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard-dir needs tensorboardX", hint="pip install tensorboardX") from None
    if cfg.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb-project needs wandb", hint="pip install wandb") from None


def trackers(cfg, run: RunDir):
    from levanter.tracker.tracker import NoopConfig

    trackers = []
    if cfg.wandb_project:
        from levanter.tracker.wandb import WandbConfig

        trackers.append(
            WandbConfig(project=cfg.wandb_project, name=run.name, id=_wandb_id(run), resume="allow", save_code=False)
        )
    if cfg.tensorboard_dir:
        from levanter.tracker.tensorboard import TensorboardConfig

        trackers.append(TensorboardConfig(logdir=cfg.tensorboard_dir))
    if not trackers:
        return NoopConfig()
    return trackers[0] if len(trackers) == 1 else tuple(trackers)


def _wandb_id(run: RunDir) -> str:
    # stable across resumes of the same run directory
    return "alpaca-" + hashlib.sha1(run.url.encode()).hexdigest()[:12]
