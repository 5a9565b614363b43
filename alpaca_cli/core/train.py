"""`alpaca train`: full fine-tuning on the prepared cache with Levanter's Trainer, resumable, on any mesh."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alpaca_cli import config as cfgmod
from alpaca_cli import distributed, logs
from alpaca_cli.core import attention as attention_mod
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import lora as lora_mod
from alpaca_cli.core.checkpoints import (checkpoint_step, is_whole, latest_checkpoint, resume_point, save_base_files,
                                        save_hook, save_now, seal_every_save)
from alpaca_cli.core.models import COPY_WEIGHTS, check_vocab, check_weights, load_base_weights, open_base_model
from alpaca_cli.core.plan import Plan, make_plan, split_validation
from alpaca_cli.errors import AlpacaError, ConfigError, StageError
from alpaca_cli.records import (
    MemoryEstimate,
    MeshShape,
    OptimizerSummary,
    PlanRecord,
    TrainInputs,
    TrainProgress,
    TrainRecord,
    TrainSummary,
)
from alpaca_cli.rundir import HEARTBEAT_SECONDS, RUNNING, RunDir
from alpaca_cli.train_config import TrainConfig

logger = logging.getLogger(__name__)

TP_AXES = ["mlp", "heads", "kv_head"]  # Levanter's names: MLP hidden, attention heads, and (GQA) kv heads


@dataclass
class TrainResult:
    status: str  # "trained", "already_trained" or "planned"
    plan: PlanRecord
    steps_run: int = 0
    final_checkpoint: str | None = None
    final_loss: float | None = None
    losses: list[float] = field(default_factory=list)


# -- planning -------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What train needs from the prepare stage."""

    cache: cachemod.PreparedCache
    tokenizer: object
    added: dict[str, str]
    fingerprint: str
    prompts: object  # PromptTemplates
    lengths: np.ndarray
    trained: np.ndarray


def load_prepared(run: RunDir) -> Prepared:
    record = run.require_prepare()
    prepared_cache = cachemod.open_run_cache(run)
    return Prepared(
        cache=prepared_cache,
        tokenizer=run.load_tokenizer(),
        added=dict(record.summary.added_tokens) if record.summary else {},
        fingerprint=record.fingerprint,
        prompts=record.config.prompts,
        lengths=prepared_cache.lengths(),
        trained=prepared_cache.trained_tokens(),
    )


def _mesh_shape(cfg, n_devices: int) -> tuple[int, int]:
    tp = cfg.tensor_parallel
    if n_devices % tp:
        divisors = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
        raise ConfigError(f"--tensor-parallel {tp} does not divide the {n_devices} devices; "
                          f"use one of {', '.join(map(str, divisors))}")
    return n_devices // tp, tp


def _row_multiple(cfg, dp: int) -> int:
    pdp = cfg.trainer.per_device_parallelism
    return dp * (pdp if pdp and pdp > 0 else 1)


def _check_shapes(cfg, lev_config, base, dp: int) -> None:
    problems = []
    tp = cfg.tensor_parallel
    ctx = base.context_length
    if ctx is not None and cfg.seq_len > ctx:
        problems.append(f"--seq-len {cfg.seq_len} is longer than the model's context ({ctx} tokens)")
    if tp > 1:
        for name, attr in (("kv heads", "num_kv_heads"), ("attention heads", "num_heads"), ("MLP width", "intermediate_dim")):
            value = getattr(lev_config, attr, None)
            if value is not None and value % tp:
                problems.append(f"--tensor-parallel {tp} does not divide the model's {name} ({value})")
    hidden = getattr(lev_config, "hidden_dim", None)
    if hidden is not None and hidden % dp:
        problems.append(
            f"the model's hidden size {hidden} does not divide over the {dp} data-parallel (FSDP) devices; "
            "use --tensor-parallel to make fewer"
        )
    if problems:
        raise ConfigError(problems)


def parameter_count(lev_config, vocab: int, lora_record=None) -> tuple[int, int]:
    """(parameters of the model, of them trained): all, or the adapters' with LoRA. From shapes alone."""
    import equinox as eqx
    import haliax as hax
    import jax

    def count(tree) -> int:
        leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
        return int(sum(np.prod(x.shape) for x in leaves))

    key = jax.random.PRNGKey(0)
    shape = eqx.filter_eval_shape(lev_config.build, hax.Axis("vocab", vocab), key=key)
    if lora_record is None:
        return count(shape), count(shape)
    from alpaca_cli.core import lora

    adapted = eqx.filter_eval_shape(lambda: lora.add_adapters(lev_config.build(hax.Axis("vocab", vocab), key=key),
                                                              lora_record, key))
    return count(shape), count(lora.adapters_only(adapted))


def activation_bytes(cfg: TrainConfig, lev_config, rows_per_device: float, compute_bytes: int, vocab: int) -> float:
    """A rough estimate of one device's activation memory for a forward and backward pass (before tensor
    parallelism). With remat, the residual stream of every layer plus one layer's working set; without, every
    layer's working set. Vanilla attention materialises [heads, row, row] scores per row; flash and splash do not.
    (issue-12's compiled plan replaces the estimate with XLA's own figure.)"""
    pdp = cfg.trainer.per_device_parallelism
    rows = pdp if pdp and pdp > 0 else rows_per_device
    hidden = getattr(lev_config, "hidden_dim", 0) or 0
    layers = getattr(lev_config, "num_layers", 0) or 0
    mlp = getattr(lev_config, "intermediate_dim", 4 * hidden) or 4 * hidden
    heads = getattr(lev_config, "num_heads", 1) or 1
    tokens = rows * cfg.seq_len
    layer_set = tokens * (hidden * 12 + mlp * 3) * compute_bytes
    if lev_config.attn_backend is not None and getattr(lev_config.attn_backend, "value", "") == "vanilla":
        layer_set += rows * heads * cfg.seq_len * cfg.seq_len * 4
    logits = tokens * 8 * vocab  # float32 logits and their gradient
    if cfg.remat:
        return tokens * hidden * compute_bytes * layers + layer_set + logits
    return layer_set * layers + logits


def plan_summary(
    cfg: TrainConfig, plan: Plan, *, n_devices: int, n_hosts: int, dp: int, tp: int, params: int, trainable: int,
    lev_config, mp, vocab: int, model: str, model_type: str, attention,
) -> PlanRecord:
    import jax
    import jax.numpy as jnp

    param_bytes = jnp.dtype(mp.param_dtype).itemsize
    compute_bytes = jnp.dtype(mp.compute_dtype).itemsize
    # params + grads in param dtype + Adam's two moments in float32, all sharded over every device (FSDP x TP)
    # trained parameters: the parameter, its gradient (param dtype) and Adam's two float32 moments; with LoRA the
    # frozen base is held in the compute dtype
    state_bytes = (trainable * (2 * param_bytes + 8) + (params - trainable) * compute_bytes) / n_devices
    act_bytes = activation_bytes(cfg, lev_config, plan.rows_per_step / dp, compute_bytes, vocab) / tp
    return PlanRecord(
        model=model,
        model_type=model_type,
        parameters=params,
        devices=n_devices,
        hosts=n_hosts,
        platform=jax.devices()[0].platform,
        mesh=MeshShape(data_parallel_fsdp=dp, tensor_parallel=tp),
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        batch_size_examples=cfg.batch_size,
        rows_per_step=plan.rows_per_step,
        examples_per_step=round(plan.examples_per_step, 2),
        steps=plan.steps,
        epochs=plan.epochs,
        train_examples=plan.train_examples,
        val_examples=int(len(plan.val_examples)),
        trained_tokens=plan.trained_tokens,
        real_tokens=plan.real_tokens,
        padding_fraction=round(plan.padding_fraction, 4),
        precision=f"params {jnp.dtype(mp.param_dtype).name}, compute {jnp.dtype(mp.compute_dtype).name}",
        attention=attention.backend,
        attention_block=attention.block,
        remat=cfg.remat,
        lora_r=cfg.lora_r,
        trainable_parameters=trainable,
        optimizer=OptimizerSummary(
            learning_rate=cfg.optimizer.learning_rate,
            weight_decay=cfg.optimizer.weight_decay,
            warmup=cfg.optimizer.warmup,
            lr_schedule=str(cfg.optimizer.lr_schedule),
        ),
        memory_per_device_gib=MemoryEstimate(
            model_and_optimizer=round(state_bytes / 2**30, 3),
            activations_estimate=round(act_bytes / 2**30, 3),
        ),
    )


def plan_fingerprint(prepared_fp: str, cfg, plan: Plan) -> str:
    key = {
        "prepared": prepared_fp,
        "model": cfg.model_name_or_path,
        "seq_len": cfg.seq_len,
        "pack": cfg.pack,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "steps": cfg.steps,
        "seed": cfg.trainer.seed,
        "max_segments": cfg.max_segments_per_row,
        "val_fraction": cfg.val_fraction,
        "rows_per_step": plan.rows_per_step,
        "plan_steps": plan.steps,
        "lora": dataclasses.asdict(lora_mod.record(cfg)) if cfg.lora else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# -- training -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, run: RunDir, *, dry_run: bool = False, target: str | None = None, progress_factory=None,
          on_plan=None) -> TrainResult:
    """Plan, then (unless dry_run) train or resume. Returns what was done.

    target (with dry_run): plan for that machine (core/topology.py) instead of the devices present, and compile the
    training step for it (core/compiled_plan.py; the process must have started JAX with the target's device count
    of simulated CPU devices: compiled_plan.simulate_devices). on_plan(plan) is called with the plan before any
    weights are loaded.
    """
    from alpaca_cli.core import topology

    machine = topology.get(target) if target else None
    if machine is not None and not dry_run:
        raise ConfigError("--target plans a run for another machine: use it with --dry-run")
    distributed.initialize()
    import jax

    if machine is not None:
        from alpaca_cli.core.compiled_plan import check_devices

        check_devices(machine)

    _check_tracker_packages(cfg)
    # every process decides from the same manifest: process 0's, as it was when training started
    run.sync_from_writer()
    prepared = load_prepared(run)
    if cfg.prompts is not None and cfg.prompts != prepared.prompts:
        raise ConfigError(
            "the config's prompts differ from the templates this run was prepared with",
            hint="drop `prompts` from the train config, or re-run alpaca prepare --prompts with them",
        )

    n_devices = jax.device_count()
    dp, tp = _mesh_shape(cfg, n_devices)
    platform = machine.platform if machine is not None else attention_mod.platform_of(jax.devices()[0])
    attention = attention_mod.choose(cfg.attention, cfg.attention_block, cfg.seq_len, platform)
    row_multiple = _row_multiple(cfg, dp)
    seed = cfg.trainer.seed

    train_ids, val_ids = split_validation(len(prepared.lengths), cfg.val_fraction, seed)
    plan = make_plan(
        prepared.lengths,
        prepared.trained,
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        steps=cfg.steps,
        row_multiple=row_multiple,
        seed=seed,
        max_segments=cfg.max_segments_per_row,
        train_ids=train_ids,
        val_ids=val_ids,
    )

    with open_base_model(cfg.model_name_or_path) as base:
        check_vocab(base, prepared.tokenizer, prepared.added)
        base.check_supported(cfg.seq_len)
        if not dry_run:  # a plan needs config.json alone
            check_weights(base, f"--model {base.spec}", hint=COPY_WEIGHTS)
        lev_config = base.lev_config(cfg.seq_len, attention, cfg.remat)
        _check_shapes(cfg, lev_config, base, dp)
        lora_record = lora_mod.record(cfg)
        if lora_record is not None:
            lora_mod.check_family(base.model_type, cfg.model_name_or_path)
        params, trained = parameter_count(lev_config, len(prepared.tokenizer), lora_record)
        summary = plan_summary(
            cfg, plan, n_devices=n_devices, n_hosts=jax.process_count(), dp=dp, tp=tp, params=params,
            trainable=trained, lev_config=lev_config, mp=cfg.trainer.mp, vocab=len(prepared.tokenizer),
            model=cfg.model_name_or_path, model_type=base.model_type, attention=attention,
        )
        fingerprint = plan_fingerprint(prepared.fingerprint, cfg, plan)
        if dry_run:
            if machine is not None:
                summary.platform = machine.name
                summary.hosts = machine.hosts
                summary.compiled = _compiled_plan(cfg, run, plan, summary, lev_config, len(prepared.tokenizer),
                                                  machine)
            return TrainResult("planned", summary)

        previous = run.train
        # the plan is locked once a checkpoint of this run follows it: before that, a failed start (a wrong --model)
        # is corrected by running again with other settings
        if previous is not None and previous.plan_fingerprint not in (None, fingerprint) and latest_checkpoint(run):
            raise StageError(
                f"run {run.url} was trained with a different plan (model, data, batch size, steps, seq len, "
                "seed or device count changed); resume it with the same settings and devices, or use a new --run-dir"
            )
        if previous is not None and previous.complete:
            final = previous.final_checkpoint
            if final and is_whole(run, run.resolve(final)):
                return TrainResult(
                    "already_trained", summary, final_checkpoint=run.resolve(final),
                    final_loss=previous.summary.final_loss if previous.summary else None,
                )
        resume = resume_point(run)
        fresh = previous is None or previous.plan_fingerprint != fingerprint
        record = previous if not fresh and previous.status == RUNNING else None
        if record is None:
            record = TrainRecord(
                config=cfgmod.encode(cfg),
                inputs=TrainInputs(prepared=prepared.fingerprint, model=cfg.model_name_or_path),
                lora=lora_record,
            )
        record.plan, record.plan_fingerprint = summary, fingerprint
        try:
            with run.stage("train", record):  # a resumed stage is started again too: this process, now, writes it
                save_base_files(run, base)
                run.write_config("train", cfgmod.dump(cfg))
                if on_plan is not None:
                    on_plan(summary)
                return _run_training(cfg, run, prepared, plan, summary, base, lev_config, dp, tp,
                                     progress_factory, resume)
        except Exception as e:
            if distributed.process_count() > 1 and not isinstance(e, AlpacaError):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise StageError(
                    f"training stopped on process {distributed.process_index()} of {distributed.process_count()} "
                    f"({type(e).__name__}: {first[:200]})",
                    hint="if another host died or was preempted, run the same command again on every host: "
                    "training resumes from the last complete checkpoint",
                ) from e
            raise


def _compiled_plan(cfg, run, plan, summary, lev_config, vocab, machine):
    """Compile the step for the target's devices and turn XLA's figures into a verdict and times."""
    from levanter.tracker.tracker import NoopConfig

    from alpaca_cli.core import compiled_plan as cp
    from alpaca_cli.records import CompiledMemory, CompiledPlan

    trainer_config = dataclasses.replace(_trainer_config(cfg, run, plan, cp.scratch_dir(), NoopConfig()),
                                         id="dry-run")
    step = cp.compile_step(cfg, plan, lev_config, vocab, machine, trainer_config, lora_mod.record(cfg))
    verdict, text = cp.verdict(step, machine)
    tokens = plan.rows_per_step * cfg.seq_len
    model_flops = cp.model_flops_per_step(summary.parameters, lev_config, tokens)
    peak = machine.peak_tflops * 1e12 * machine.devices
    steps_per_epoch = plan.steps / plan.epochs if plan.epochs else plan.steps

    def seconds(mfu):
        return model_flops / (mfu * peak)

    r = lambda x, n=3: round(float(x), n)  # noqa: E731
    return CompiledPlan(
        target=machine.name,
        memory_per_device_gib=CompiledMemory(
            arguments=r(step.arguments_gib), outputs=r(step.outputs_gib), aliased=r(step.aliased_gib),
            temporaries=r(step.temporaries_gib), total=r(step.total_gib), cpu_upcast=r(step.upcast_gib),
            accelerator_total=r(step.accelerator_total_gib), target_memory=machine.memory_gib,
            target_usable=r(machine.usable_gib), verdict=verdict, verdict_text=text,
        ),
        compiled_flops_per_step=float(f"{step.flops_per_device * machine.devices:.4e}"),
        model_flops_per_step=float(f"{model_flops:.4e}"),
        step_seconds_at_40_mfu=r(seconds(0.4)), step_seconds_at_60_mfu=r(seconds(0.6)),
        epoch_hours_at_40_mfu=r(seconds(0.4) * steps_per_epoch / 3600, 2),
        epoch_hours_at_60_mfu=r(seconds(0.6) * steps_per_epoch / 3600, 2),
        compile_seconds=r(step.compile_seconds, 1),
    )


def _trainer_config(cfg, run: RunDir, plan: Plan, log_dir: str, trackers, resume: str | None = None):
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
        # Levanter's train_batch_size counts what it stacks into a batch: our packed rows. Ours (the config key, in
        # the tutorial's meaning) counted examples; the plan turned it into rows.
        train_batch_size=plan.rows_per_step,
        num_train_steps=plan.steps,
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


def _check_tracker_packages(cfg) -> None:
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


def _trackers(cfg, run: RunDir):
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


def _run_training(cfg, run, prepared, plan, summary, base, lev_config, dp, tp, progress_factory,
                  resume) -> TrainResult:
    import haliax as hax
    import jax.random as jrandom
    import levanter
    from haliax.partitioning import round_axis_for_partitioning
    from levanter.trainer import Trainer

    from alpaca_cli.core.batches import PackedRows, make_loss_fn
    from alpaca_cli.core.hooks import (CheckpointRetention, EvalHook, ManifestHook, MetricsHook, PreemptionHook,
                                       fire_from_the_first_step)

    tok = prepared.tokenizer
    log_dir = run.local_logs_dir()
    trainer_config = _trainer_config(cfg, run, plan, log_dir, _trackers(cfg, run), resume)
    with logs.keep_console_handlers():
        trainer_config.initialize()
    levanter.tracker.log_configuration(cfg)

    accum = 1
    pdp = trainer_config.per_device_parallelism
    if pdp and pdp > 0:
        accum = plan.rows_per_step // (pdp * trainer_config.data_axis_size)
    optimizer = cfg.optimizer.build(plan.steps)
    real_vocab = len(tok)
    loss_fn = make_loss_fn(real_vocab, accum_steps=max(1, accum))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    Pos = lev_config.max_Pos

    with Trainer(trainer_config, optimizer, loss_fn, add_default_hooks=False) as trainer:
        fire_from_the_first_step(trainer)
        param_mapping = trainer.parameter_axis_mapping
        Vocab = round_axis_for_partitioning(hax.Axis("vocab", real_vocab), param_mapping)
        if Vocab.size != real_vocab:
            logger.info("Vocabulary padded from %d to %d for sharding (masked out of the loss)", real_vocab, Vocab.size)
        run.train.vocab_trained = Vocab.size
        run.save()
        _, model_key, training_key, lora_key = jrandom.split(jrandom.PRNGKey(cfg.trainer.seed), 4)

        if cfg.lora:
            # the frozen base is loaded every time (the checkpoints hold the adapters only), straight into the
            # compute dtype (a 7B model in float32 would not fit where LoRA is for); the trainer restores the
            # adapters and their optimizer state from the latest checkpoint, if any
            logger.info("Loading base weights from %s", cfg.model_name_or_path)
            model = load_base_weights(base, lev_config, tok, Vocab, param_mapping, trainer.mp,
                                      dtype=trainer.mp.compute_dtype)
            model = lora_mod.add_adapters(model, run.train.lora, lora_key)
            state = trainer.initial_state(training_key, model=model, is_trainable=lora_mod.trainable(model))
            start_step = int(state.step)
        else:
            state = trainer.initial_state(training_key, model_init=lambda: lev_config.build(Vocab, key=model_key))
            start_step = int(state.step)
            if start_step == 0:
                logger.info("Loading base weights from %s", cfg.model_name_or_path)
                state = dataclasses.replace(state, model=None)
                model = load_base_weights(base, lev_config, tok, Vocab, param_mapping, trainer.mp)
                state = dataclasses.replace(state, model=model)
        if start_step:
            logger.info("Resuming from the checkpoint after step %d of %d", start_step, plan.steps)

        if start_step >= plan.steps:
            final = latest_checkpoint(run)
            _finish(run, plan, final, None)
            return TrainResult("already_trained", summary, final_checkpoint=final)

        dataset = PackedRows(
            prepared.cache, plan.rows, Pos, pad_id, step_tokens=plan.step_tokens, rows_per_step=plan.rows_per_step
        )
        checkpointer = trainer.config.checkpointer.create(trainer.run_id)
        seal_every_save(checkpointer, run)
        metrics = MetricsHook(run, plan, cfg.optimizer.lr_scheduler(plan.steps), start_step, progress_factory)
        metrics.before_checkpoints_of(checkpointer)
        manifest_hook = ManifestHook(run, plan, metrics, every_seconds=HEARTBEAT_SECONDS)
        retention = CheckpointRetention(run, cfg.keep_checkpoints)
        trainer.add_hook(metrics, every=1)
        trainer.add_hook(levanter.callbacks.log_step_info(plan.steps), every=1)
        trainer.add_hook(save_hook(checkpointer), every=1)
        trainer.add_hook(retention, every=1)
        trainer.add_hook(manifest_hook, every=1)
        preemption = PreemptionHook(checkpointer)
        trainer.add_hook(preemption, every=1)
        val_source = _validation_source(cfg, run, prepared, plan)
        if val_source is not None:
            from alpaca_cli.core.plan import pack_rows

            val_cache, val_lengths, val_ids = val_source
            val_rows = pack_rows(val_ids, val_lengths, cfg.seq_len, cfg.max_segments_per_row)
            val_rows += [np.zeros(0, np.int64)] * ((-len(val_rows)) % trainer_config.data_axis_size)
            val_dataset = PackedRows(val_cache, val_rows, Pos, pad_id)
            eval_hook = EvalHook(trainer, val_dataset, real_vocab, metrics, batch_rows=trainer_config.data_axis_size)
            trainer.add_hook(eval_hook, every=cfg.eval_every)
        loader = trainer.data_loader(dataset).iter_from_step(start_step)

        distributed.barrier("before-training")  # every host compiles the first step at the same time
        metrics.start()
        try:
            info = trainer.train(state, loader)  # runs every hook once more (forced) at the end
        finally:
            metrics.stop()
            preemption.close()
        checkpointer.wait_until_finished()
        final = latest_checkpoint(run)
        # saving is collective: every process must take the same decision
        if distributed.broadcast(final is None or checkpoint_step(final) != info.step):
            # Levanter's forced end-of-training save can be skipped; make sure the final state is on disk
            save_now(checkpointer, info)
            checkpointer.wait_until_finished()
            final = latest_checkpoint(run)
        distributed.barrier("final-checkpoint")
        metrics.flush()
        retention.on_step(info, force=True)
        _finish(run, plan, final, info.loss)
        return TrainResult(
            "trained", summary, steps_run=plan.steps - start_step, final_checkpoint=final,
            final_loss=float(info.loss), losses=list(metrics.losses_this_run),
        )


def _validation_source(cfg, run: RunDir, prepared: Prepared, plan: Plan):
    """(cache, lengths, example ids) of the held-out set: a slice of the prepared data, or --val-data."""
    if len(plan.val_examples):
        return prepared.cache, prepared.lengths, plan.val_examples
    if not cfg.val_data:
        return None
    from alpaca_cli.core.prepare import prepare_validation

    cache_dir = distributed.on_writer(lambda: prepare_validation(run, cfg.val_data))
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
