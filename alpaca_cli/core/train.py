"""`alpaca train`: full fine-tuning on the prepared cache with Levanter's Trainer, resumable, on any mesh."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from alpaca_cli import config as cfgmod
from alpaca_cli import distributed, logs
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import lora as lora_mod
from alpaca_cli.core import resume as resume_mod
from alpaca_cli.core.checkpoints import (checkpoint_step, is_whole, latest_checkpoint, resume_point, save_base_files,
                                        save_hook, save_now, seal_every_save)
from alpaca_cli.core.models import load_base_weights, open_base_model
from alpaca_cli.core.plan import Plan
from alpaca_cli.core.train_setup import TrainSetup, layout_for, load_prepared, set_up
from alpaca_cli.core.trainer_config import check_tracker_packages, trackers, trainer_config
from alpaca_cli.errors import AlpacaError, ConfigError, StageError, first_line
from alpaca_cli.records import (
    PlanRecord,
    TrainInputs,
    TrainProgress,
    TrainRecord,
    TrainSummary,
)
from alpaca_cli.rundir import HEARTBEAT_SECONDS, RUNNING, RunDir
from alpaca_cli.train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` did; the train record holds the rest (for a dry run: a record with the plan alone, never
    saved)."""

    status: str  # "trained", "already_trained" or "planned"
    record: TrainRecord
    final_checkpoint: str | None = None
    """The final checkpoint's full path (the record keeps it relative to the run directory)."""

    @property
    def plan(self) -> PlanRecord:
        return self.record.plan

    @property
    def final_loss(self) -> float | None:
        return self.record.summary.final_loss if self.record.summary else None


# -- training -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, run: RunDir, *, dry_run: bool = False, target: str | None = None, progress_factory=None,
          on_plan=None) -> TrainResult:
    """Plan, then (unless dry_run) train or resume. Returns what was done.

    target (with dry_run): plan for that machine (core/machines.py) instead of the devices present, and compile the
    training step for it (core/target_compile.py; the process must have started JAX with the target's device count
    of simulated CPU devices: target_compile.simulate_devices). on_plan(plan) is called with the plan before any
    weights are loaded.
    """
    machine = _start(cfg, target, dry_run)
    # every process decides from the same manifest: process 0's, as it was when training started
    run.sync_from_writer()
    prepared = load_prepared(run)
    if cfg.prompts is not None and cfg.prompts != prepared.prompts:
        raise ConfigError(
            "the config's prompts differ from the templates this run was prepared with",
            hint="drop `prompts` from the train config, or re-run alpaca prepare --prompts with them",
        )
    layout = layout_for(cfg, prepared, machine)
    with open_base_model(cfg.model_name_or_path) as base:
        setup = set_up(cfg, run, prepared, layout, base, dry_run=dry_run)
        if dry_run:
            return _dry_run(setup, machine)
        setup.progress_factory = progress_factory
        return _train_or_resume(setup, on_plan)


def _start(cfg: TrainConfig, target: str | None, dry_run: bool):
    """Start JAX (on a pod, every process) and check what the run needs beside the data; returns the target
    machine, if any."""
    from alpaca_cli.core import machines

    machine = machines.get(target) if target else None
    if machine is not None and not dry_run:
        raise ConfigError("--target plans a run for another machine: use it with --dry-run")
    distributed.initialize()
    if machine is not None:
        from alpaca_cli.core.target_compile import check_devices

        check_devices(machine)
    check_tracker_packages(cfg)
    return machine


def _dry_run(setup: TrainSetup, machine) -> TrainResult:
    summary = setup.summary
    last = latest_checkpoint(setup.run)
    # a checkpoint named step-N holds the state after N + 1 updates (Levanter saves after step index N)
    summary.resumes = resume_mod.note(setup.run.train, setup.inputs, checkpoint_step(last) + 1 if last else None,
                                      summary)
    if machine is not None:
        summary.platform = machine.name
        summary.hosts = machine.hosts
        summary.compiled = _compile_for_target(setup, machine)
    return TrainResult("planned", TrainRecord(plan=summary))


def _train_or_resume(setup: TrainSetup, on_plan) -> TrainResult:
    run = setup.run
    previous = run.train
    done = _already_trained(setup, previous)
    if done is not None:
        return done
    setup.resume = resume_point(run)
    record = _stage_record(setup, previous)
    try:
        with run.stage("train", record):  # a resumed stage is started again too: this process, now, writes it
            save_base_files(run, setup.base)
            run.write_config("train", cfgmod.dump(setup.cfg))
            if on_plan is not None:
                on_plan(setup.summary)
            return _run_training(setup)
    except Exception as e:
        if distributed.process_count() > 1 and not isinstance(e, AlpacaError):
            first = first_line(e, None) or type(e).__name__
            raise StageError(
                f"training stopped on process {distributed.process_index()} of {distributed.process_count()} "
                f"({type(e).__name__}: {first[:200]})",
                hint="if another host died or was preempted, run the same command again on every host: "
                "training resumes from the last complete checkpoint",
            ) from e
        raise


def _already_trained(setup: TrainSetup, previous: TrainRecord | None) -> TrainResult | None:
    """The result of a run that finished before; an error if the run followed another plan."""
    run = setup.run
    # the plan is locked once a checkpoint of this run follows it: before that, a failed start (a wrong --model)
    # is corrected by running again with other settings
    if previous is not None and previous.plan_fingerprint not in (None, setup.fingerprint) and latest_checkpoint(run):
        resume_mod.check_same_plan(run.url, previous.plan_inputs, setup.inputs)
    if previous is not None and previous.complete:
        final = previous.final_checkpoint
        if final and is_whole(run, run.resolve(final)):
            return TrainResult("already_trained", previous, final_checkpoint=run.resolve(final))
    return None


def _stage_record(setup: TrainSetup, previous: TrainRecord | None) -> TrainRecord:
    """The record the train stage runs with: a running one of the same plan is continued, anything else replaced."""
    cfg = setup.cfg
    fresh = previous is None or previous.plan_fingerprint != setup.fingerprint
    record = previous if not fresh and previous.status == RUNNING else None
    if record is None:
        record = TrainRecord(
            config=cfgmod.encode(cfg),
            inputs=TrainInputs(prepared=setup.prepared.fingerprint, model=cfg.model_name_or_path),
            lora=setup.lora,
        )
    if not fresh:
        record.segments = previous.segments  # the machines it trained on so far (_run_training adds this one)
    record.plan, record.plan_fingerprint, record.plan_inputs = setup.summary, setup.fingerprint, setup.inputs
    return record


def _compile_for_target(setup: TrainSetup, machine):
    """Compile the step for the target's devices and turn XLA's figures into a verdict and times."""
    from levanter.tracker.tracker import NoopConfig

    from alpaca_cli.core import target_compile as cp
    from alpaca_cli.records import CompiledMemory, CompiledPlan

    cfg, plan, lev_config = setup.cfg, setup.plan, setup.lev_config
    levanter_config = dataclasses.replace(trainer_config(cfg, setup.run, setup.layout, cp.scratch_dir(), NoopConfig()),
                                         id="dry-run")
    step = cp.compile_step(cfg, plan, lev_config, setup.vocab, machine, levanter_config, setup.lora)
    verdict, text = cp.verdict(step, machine)
    tokens = setup.layout.rows_per_batch * cfg.seq_len
    model_flops = cp.model_flops_per_step(setup.summary.parameters, lev_config, tokens)
    peak = machine.peak_tflops * 1e12 * machine.devices
    steps_per_epoch = plan.steps / plan.epochs if plan.epochs else plan.steps

    def seconds(mfu):
        return model_flops / (mfu * peak)

    r = lambda x, n=3: round(float(x), n)  # noqa: E731
    return CompiledPlan(
        target=machine.name, compiler=step.compiler, compiled_by=cp.compiler_line(machine, step.compiler),
        memory_per_device_gib=CompiledMemory(
            arguments=r(step.arguments_gib), outputs=r(step.outputs_gib), aliased=r(step.aliased_gib),
            temporaries=r(step.temporaries_gib), total=r(step.total_gib), cpu_upcast=r(step.upcast_gib),
            accelerator_total=r(step.accelerator_total_gib), target_memory=machine.memory_gib,
            target_usable=r(machine.usable_gib), verdict=verdict, verdict_text=text,
            refused=step.needed_gib is not None,
        ),
        compiled_flops_per_step=float(f"{step.flops_per_device * machine.devices:.4e}"),
        model_flops_per_step=float(f"{model_flops:.4e}"),
        step_seconds_at_40_mfu=r(seconds(0.4)), step_seconds_at_60_mfu=r(seconds(0.6)),
        epoch_hours_at_40_mfu=r(seconds(0.4) * steps_per_epoch / 3600, 2),
        epoch_hours_at_60_mfu=r(seconds(0.6) * steps_per_epoch / 3600, 2),
        compile_seconds=r(step.compile_seconds, 1),
    )


@dataclass
class _Hooks:
    """The hooks that training's end waits on, flushes or closes."""

    checkpointer: object
    metrics: object  # hooks.MetricsHook
    retention: object  # hooks.CheckpointRetention
    preemption: object  # hooks.PreemptionHook


def _run_training(setup: TrainSetup) -> TrainResult:
    from levanter.trainer import Trainer

    from alpaca_cli.core.hooks import fire_from_the_first_step

    run, plan = setup.run, setup.plan
    levanter_config, optimizer, loss_fn = _trainer_parts(setup)
    with Trainer(levanter_config, optimizer, loss_fn, add_default_hooks=False) as trainer:
        fire_from_the_first_step(trainer)
        t0 = time.time()
        state = _initial_state(setup, trainer)
        start_step = int(state.step)
        if start_step >= plan.steps:
            final = latest_checkpoint(run)
            _finish(run, plan, final, None)
            return TrainResult("already_trained", run.train, final_checkpoint=final)
        line = resume_mod.start_segment(run.train, run.train.segments, start_step, setup.summary)
        run.save()
        if line:
            logger.info("%s (state restored in %.1f s)", line, time.time() - t0)
        hooks = _add_hooks(setup, trainer, start_step)
        info = _loop(setup, trainer, state, hooks, start_step)
        final = _final_checkpoint(setup, hooks, info)
        hooks.metrics.flush()
        hooks.retention.on_step(info, force=True)
        _finish(run, plan, final, info.loss)
        return TrainResult("trained", run.train, final_checkpoint=final)


def _trainer_parts(setup: TrainSetup):
    """(Levanter's trainer config, initialized; the optimizer; the loss function)."""
    import levanter

    from alpaca_cli.core.batches import make_loss_fn

    cfg, run, plan = setup.cfg, setup.run, setup.plan
    log_dir = run.local_logs_dir()
    levanter_config = trainer_config(cfg, run, setup.layout, log_dir, trackers(cfg, run), setup.resume)
    with logs.keep_console_handlers():
        levanter_config.initialize()
    levanter.tracker.log_configuration(cfg)
    accum = 1
    pdp = levanter_config.per_device_parallelism
    if pdp and pdp > 0:
        accum = setup.layout.rows_per_batch // (pdp * levanter_config.data_axis_size)
    optimizer = cfg.optimizer.build(plan.steps)
    return levanter_config, optimizer, make_loss_fn(setup.vocab, accum_steps=max(1, accum))


def _initial_state(setup: TrainSetup, trainer):
    """The trainer's state: restored from setup.resume, or the base model's weights (with new adapters for LoRA)."""
    import haliax as hax
    import jax.random as jrandom
    from haliax.partitioning import round_axis_for_partitioning

    cfg, run = setup.cfg, setup.run
    Vocab = round_axis_for_partitioning(hax.Axis("vocab", setup.vocab), trainer.parameter_axis_mapping)
    if Vocab.size != setup.vocab:
        logger.info("Vocabulary padded from %d to %d for sharding (masked out of the loss)", setup.vocab, Vocab.size)
    run.train.vocab_trained = Vocab.size
    run.save()
    _, model_key, training_key, lora_key = jrandom.split(jrandom.PRNGKey(cfg.trainer.seed), 4)
    if cfg.lora:
        # the frozen base is loaded every time (the checkpoints hold the adapters only), straight into the
        # compute dtype (a 7B model in float32 would not fit where LoRA is for); the trainer restores the
        # adapters and their optimizer state from the latest checkpoint, if any
        model = _base_weights(setup, trainer, Vocab, dtype=trainer.mp.compute_dtype)
        model = lora_mod.add_adapters(model, run.train.lora, lora_key)
        return trainer.initial_state(training_key, model=model, is_trainable=lora_mod.trainable(model))
    state = trainer.initial_state(training_key, model_init=lambda: setup.lev_config.build(Vocab, key=model_key))
    if int(state.step) == 0:
        state = dataclasses.replace(state, model=None)
        state = dataclasses.replace(state, model=_base_weights(setup, trainer, Vocab))
    return state


def _base_weights(setup: TrainSetup, trainer, Vocab, dtype=None):
    logger.info("Loading base weights from %s", setup.cfg.model_name_or_path)
    return load_base_weights(setup.base, setup.lev_config, setup.prepared.tokenizer, Vocab,
                             trainer.parameter_axis_mapping, trainer.mp, dtype=dtype)


def _add_hooks(setup: TrainSetup, trainer, start_step: int) -> _Hooks:
    import levanter

    from alpaca_cli.core.hooks import CheckpointRetention, ManifestHook, MetricsHook, PreemptionHook

    cfg, run, plan = setup.cfg, setup.run, setup.plan
    checkpointer = trainer.config.checkpointer.create(trainer.run_id)
    retention = CheckpointRetention(run, cfg.keep_checkpoints)
    seal_every_save(checkpointer, run, on_sealed=retention.sealed)
    metrics = MetricsHook(run, plan, cfg.optimizer.lr_scheduler(plan.steps), start_step, setup.progress_factory)
    metrics.before_checkpoints_of(checkpointer)
    manifest_hook = ManifestHook(run, plan, metrics, every_seconds=HEARTBEAT_SECONDS)
    trainer.add_hook(metrics, every=1)
    trainer.add_hook(levanter.callbacks.log_step_info(plan.steps), every=1)
    trainer.add_hook(save_hook(checkpointer), every=1)
    trainer.add_hook(retention, every=1)
    trainer.add_hook(manifest_hook, every=1)
    preemption = PreemptionHook(checkpointer)
    trainer.add_hook(preemption, every=1)
    _add_eval_hook(setup, trainer, metrics)
    return _Hooks(checkpointer, metrics, retention, preemption)


def _add_eval_hook(setup: TrainSetup, trainer, metrics) -> None:
    """Score the held-out set every --eval-every steps, if there is one."""
    from alpaca_cli.core.batches import PackedRows
    from alpaca_cli.core.hooks import EvalHook
    from alpaca_cli.core.plan import pack_rows

    val_source = _validation_source(setup)
    if val_source is None:
        return
    cfg, slots = setup.cfg, trainer.config.data_axis_size
    val_cache, val_lengths, val_ids = val_source
    val_rows = pack_rows(val_ids, val_lengths, cfg.seq_len, cfg.max_segments_per_row)
    val_rows += [np.zeros(0, np.int64)] * ((-len(val_rows)) % slots)
    val_dataset = PackedRows(val_cache, val_rows, setup.lev_config.max_Pos, setup.pad_id)
    eval_hook = EvalHook(trainer, val_dataset, setup.vocab, metrics, batch_rows=slots)
    trainer.add_hook(eval_hook, every=cfg.eval_every)


def _loop(setup: TrainSetup, trainer, state, hooks: _Hooks, start_step: int):
    """Train from start_step to the plan's end; Levanter's StepInfo of the last step."""
    from alpaca_cli.core.batches import PackedRows

    plan = setup.plan
    dataset = PackedRows(setup.prepared.cache, plan.rows, setup.lev_config.max_Pos, setup.pad_id,
                         step_tokens=plan.step_tokens, rows_per_step=plan.rows_per_step,
                         rows_per_batch=setup.layout.rows_per_batch)
    loader = trainer.data_loader(dataset).iter_from_step(start_step)
    distributed.barrier("before-training")  # every host compiles the first step at the same time
    hooks.metrics.start()
    try:
        return trainer.train(state, loader)  # runs every hook once more (forced) at the end
    finally:
        hooks.metrics.stop()
        hooks.preemption.close()


def _final_checkpoint(setup: TrainSetup, hooks: _Hooks, info) -> str | None:
    """The checkpoint of the last step, saved now if Levanter's forced end-of-training save was skipped."""
    checkpointer = hooks.checkpointer
    checkpointer.wait_until_finished()
    final = latest_checkpoint(setup.run)
    # saving is collective: every process must take the same decision
    if distributed.broadcast(final is None or checkpoint_step(final) != info.step):
        save_now(checkpointer, info)
        checkpointer.wait_until_finished()
        final = latest_checkpoint(setup.run)
    distributed.barrier("final-checkpoint")
    return final


def _validation_source(setup: TrainSetup):
    """(cache, lengths, example ids) of the held-out set: a slice of the prepared data, or --val-data."""
    cfg, prepared, plan = setup.cfg, setup.prepared, setup.plan
    if len(plan.val_examples):
        return prepared.cache, prepared.lengths, plan.val_examples
    if not cfg.val_data:
        return None
    from alpaca_cli.core.prepare import prepare_validation

    cache_dir = distributed.on_writer(lambda: prepare_validation(setup.run, cfg.val_data))
    val_cache = cachemod.open_cache(cache_dir)
    lengths = val_cache.lengths()
    too_long = int((lengths > cfg.seq_len).sum())
    if too_long:
        raise ConfigError(f"{too_long} example(s) of --val-data are longer than --seq-len {cfg.seq_len}")
    return val_cache, lengths, np.arange(len(lengths), dtype=np.int64)


def _finish(run: RunDir, plan: Plan, final: str | None, loss) -> None:
    rel = run.relative(final) if final else None
    record = run.train
    loss = None if loss is None else float(loss)
    record.final_checkpoint = rel
    record.summary = TrainSummary(steps=plan.steps, final_loss=loss)
    record.progress = TrainProgress(step=plan.steps, total_steps=plan.steps, loss=loss, last_checkpoint=rel)
    resume_mod.report(record, plan.steps)
