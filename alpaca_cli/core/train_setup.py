"""What a training run is, decided before any weight is loaded: the prepared data it reads, how the plan spreads
over the devices (`Layout`), the model's size and memory, and the plan's record and fingerprint (`TrainSetup`).
Everything `alpaca train --dry-run` prints comes from here; core/train.py runs it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from alpaca_cli.core import attention as attention_mod
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import lora as lora_mod
from alpaca_cli.core.models import COPY_WEIGHTS, check_vocab, check_weights
from alpaca_cli.core.plan import (Mixture, Plan, make_plan, mixture_weights, rows_per_batch, split_validation,
                                  split_validation_by_source)
from alpaca_cli.errors import ConfigError
from alpaca_cli.records import (LoraRecord, MemoryEstimate, MeshShape, OptimizerSummary, PlanRecord, PlanSource,
                                SourceRecord)
from alpaca_cli.rundir import RunDir
from alpaca_cli.train_config import TrainConfig


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
    sources: list[SourceRecord] = dataclasses.field(default_factory=list)
    """A mixture's sources (their row ranges, weights or epochs, held-out fractions); empty for one source."""


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
        sources=list(record.sources),
    )


def mixture_for(sources: list[SourceRecord], val_fraction: float, seed: int) -> tuple[Mixture, np.ndarray]:
    """(the Mixture train samples, the held-out ids) of a prepared mixture: each source holds out its own
    val_fraction (else train's), and is drawn by its weight, or its epochs x its training examples."""
    names = [s.name for s in sources]
    groups, val_ids = split_validation_by_source(
        [(s.rows[0], s.rows[1]) for s in sources],
        [s.val_fraction if s.val_fraction is not None else val_fraction for s in sources], seed, names)
    weights, epoch_size = mixture_weights([len(g) for g in groups], [s.weight for s in sources],
                                          [s.epochs for s in sources])
    return Mixture(groups, weights, epoch_size, names), val_ids


def plan_sources(plan: Plan, mixture: Mixture | None) -> list[PlanSource]:
    """The plan record's view of a mixture: what its steps take from each source."""
    if mixture is None:
        return []
    taken, trained = plan.source_examples, plan.source_trained
    return [PlanSource(name=name, train_examples=len(g), examples=int(taken[s]),
                       epochs=round(int(taken[s]) / max(1, len(g)), 4),
                       share_examples=round(int(taken[s]) / max(1, int(taken.sum())), 4),
                       share_trained=round(int(trained[s]) / max(1, int(trained.sum())), 4))
            for s, (name, g) in enumerate(zip(mixture.names, mixture.groups))]


@dataclass
class Layout:
    """The plan and how it spreads over the devices: decided from the prepared data before the model is opened."""

    plan: Plan
    """The same on every machine (core/plan.py)."""
    dp: int
    """Data-parallel (FSDP) devices."""
    tp: int
    """Tensor-parallel devices."""
    attention: attention_mod.AttentionChoice
    rows_per_batch: int
    """Rows of each step's batch on this mesh: the plan's, then empty ones up to a multiple of the row slots."""
    mixture: Mixture | None = None
    """The sources the plan samples (a prepared mixture), or None."""


@dataclass
class TrainSetup:
    """What every step of `train` reads, decided once before any weight is loaded."""

    cfg: TrainConfig
    run: RunDir
    prepared: Prepared
    layout: Layout
    base: object  # the open base model (core/models.py)
    lev_config: object
    lora: LoraRecord | None
    summary: PlanRecord
    inputs: dict
    """What decides the plan (plan_inputs): a resume must have the same."""
    progress_factory: object = None
    resume: str | None = None
    """The checkpoint to resume from (resume_point); None: start from the base model."""

    @property
    def plan(self) -> Plan:
        return self.layout.plan

    @property
    def fingerprint(self) -> str:
        return plan_fingerprint(self.inputs)

    @property
    def vocab(self) -> int:
        """The tokenizer's size: the rows of the embedding the loss counts."""
        return len(self.prepared.tokenizer)

    @property
    def pad_id(self) -> int:
        tok = self.prepared.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _mesh_shape(cfg, n_devices: int) -> tuple[int, int]:
    tp = cfg.tensor_parallel
    if n_devices % tp:
        divisors = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
        raise ConfigError(f"--tensor-parallel {tp} does not divide the {n_devices} devices; "
                          f"use one of {', '.join(map(str, divisors))}")
    return n_devices // tp, tp


def _row_slots(cfg, dp: int) -> int:
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
    (The compiled plan, `--dry-run --target`, replaces the estimate with XLA's own figure.)"""
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


def plan_record(cfg: TrainConfig, layout: Layout, *, params: int, trainable: int, lev_config, vocab: int,
                 model_type: str) -> PlanRecord:
    import jax
    import jax.numpy as jnp

    plan, dp, tp, mp = layout.plan, layout.dp, layout.tp, cfg.trainer.mp
    n_devices = dp * tp
    param_bytes = jnp.dtype(mp.param_dtype).itemsize
    compute_bytes = jnp.dtype(mp.compute_dtype).itemsize
    # trained parameters: the parameter, its gradient (param dtype) and Adam's two float32 moments; with LoRA the
    # frozen base is held in the compute dtype; all sharded over every device (FSDP x TP)
    state_bytes = (trainable * (2 * param_bytes + 8) + (params - trainable) * compute_bytes) / n_devices
    act_bytes = activation_bytes(cfg, lev_config, layout.rows_per_batch / dp, compute_bytes, vocab) / tp
    return PlanRecord(
        model=cfg.model_name_or_path,
        model_type=model_type,
        parameters=params,
        devices=n_devices,
        hosts=jax.process_count(),
        platform=jax.devices()[0].platform,
        mesh=MeshShape(data_parallel_fsdp=dp, tensor_parallel=tp),
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        batch_size_examples=cfg.batch_size,
        rows_per_step=plan.rows_per_step,
        rows_per_batch=layout.rows_per_batch,
        examples_per_step=round(plan.examples_per_step, 2),
        steps=plan.steps,
        epochs=plan.epochs,
        train_examples=plan.train_examples,
        val_examples=int(len(plan.val_examples)),
        trained_tokens=plan.trained_tokens,
        real_tokens=plan.real_tokens,
        padding_fraction=round(plan.padding_on(layout.rows_per_batch), 4),
        precision=f"params {jnp.dtype(mp.param_dtype).name}, compute {jnp.dtype(mp.compute_dtype).name}",
        attention=layout.attention.backend,
        attention_block=layout.attention.block,
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
        sources=plan_sources(plan, layout.mixture),
    )


def plan_inputs(prepared_fp: str, cfg, plan: Plan) -> dict:
    """What decides which examples each step trains on and how (the machine does not): a resume must have the same.
    The train record keeps it, so a refusal names what changed: by config key, the plan's own figures and the
    prepared data aside."""
    return {
        "prepared": prepared_fp,
        "model_name_or_path": cfg.model_name_or_path,
        "seq_len": cfg.seq_len,
        "pack": cfg.pack,
        "trainer.train_batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "trainer.num_train_steps": cfg.steps,
        "trainer.seed": cfg.trainer.seed,
        "max_segments_per_row": cfg.max_segments_per_row,
        "val_fraction": cfg.val_fraction,
        "rows_per_step": plan.rows_per_step,
        "plan_steps": plan.steps,
        "lora": dataclasses.asdict(lora_mod.record(cfg)) if cfg.lora else None,
    }


def plan_fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def layout_for(cfg: TrainConfig, prepared: Prepared, machine) -> Layout:
    """The plan, its batches on the devices present (or the target machine's), and the attention kernel for the
    platform."""
    import jax

    dp, tp = _mesh_shape(cfg, jax.device_count())
    platform = machine.platform if machine is not None else attention_mod.platform_of(jax.devices()[0])
    attention = attention_mod.choose(cfg.attention, cfg.attention_block, cfg.seq_len, platform)
    seed = cfg.trainer.seed
    mixture = None
    if prepared.sources:
        mixture, val_ids = mixture_for(prepared.sources, cfg.val_fraction, seed)
        train_ids = None
    else:
        train_ids, val_ids = split_validation(len(prepared.lengths), cfg.val_fraction, seed)
    plan = make_plan(
        prepared.lengths,
        prepared.trained,
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        steps=cfg.steps,
        seed=seed,
        max_segments=cfg.max_segments_per_row,
        train_ids=train_ids,
        val_ids=val_ids,
        mixture=mixture,
    )
    return Layout(plan, dp, tp, attention, rows_per_batch(plan.rows_per_step, _row_slots(cfg, dp)), mixture)


def set_up(cfg: TrainConfig, run: RunDir, prepared: Prepared, layout: Layout, base, *, dry_run: bool) -> TrainSetup:
    """Check the base model against the data and the mesh, and summarise the plan."""
    check_vocab(base, prepared.tokenizer, prepared.added)
    base.check_supported(cfg.seq_len)
    if not dry_run:  # a plan needs config.json alone
        check_weights(base, f"--model {base.spec}", hint=COPY_WEIGHTS)
    lev_config = base.lev_config(cfg.seq_len, layout.attention, cfg.remat)
    _check_shapes(cfg, lev_config, base, layout.dp)
    lora_record = lora_mod.record(cfg)
    if lora_record is not None:
        lora_mod.check_family(base.model_type, cfg.model_name_or_path)
    vocab = len(prepared.tokenizer)
    params, trained = parameter_count(lev_config, vocab, lora_record)
    summary = plan_record(cfg, layout, params=params, trainable=trained, lev_config=lev_config, vocab=vocab,
                           model_type=base.model_type)
    return TrainSetup(cfg, run, prepared, layout, base, lev_config, lora_record, summary,
                      inputs=plan_inputs(prepared.fingerprint, cfg, layout.plan))
