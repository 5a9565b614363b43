"""Trainer hooks (Levanter's callback framework): metrics.jsonl and progress, manifest updates, held-out loss."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from levanter.callbacks import Callback, StepInfo

from alpaca_cli import io
from alpaca_cli.console import format_eta
from alpaca_cli import distributed, interrupts
from alpaca_cli.core.checkpoints import delete_checkpoint, latest_checkpoint, save_now, sealed_checkpoints
from alpaca_cli.core.logits import for_inference
from alpaca_cli.core.plan import Plan
from alpaca_cli.core.resume import report
from alpaca_cli.records import TrainProgress
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)


class StepProgress:
    """Progress display protocol; the default logs a line every 10 s (the command shows a live line instead)."""

    def __init__(self, total: int, start: int):
        self.total, self.start_step = total, start
        self._last = 0.0

    def update(self, step: int, loss: float, ex_per_s: float, tok_per_s: float, eta_s: float) -> None:
        now = time.time()
        if now - self._last >= 10 or step == self.total:
            self._last = now
            logger.info(
                "step %d/%d  loss %.4f  %.1f examples/s  %.0f tokens/s  ETA %s",
                step, self.total, loss, ex_per_s, tok_per_s, format_eta(eta_s),
            )

    def message(self, text: str) -> None:
        logger.info(text)

    def close(self) -> None:
        pass


class MetricsHook(Callback):
    """One JSON object per optimizer step in RUN/metrics.jsonl, and the live progress line.

    `step` counts optimizer updates from 1. After a resume, lines past the resumed step (from the interrupted
    attempt) are dropped, so the file always describes one uninterrupted run.

    A local file gets each step's line appended at once. An object store (gs://) cannot append: every flush rewrites
    the whole object, so there it is flushed at most every `remote_flush_seconds`, before every checkpoint (so the
    lines up to the step a resume starts from are always there) and at the end.
    """

    remote_flush_seconds = 30.0

    def __init__(self, run: RunDir, plan: Plan, lr_schedule, start_step: int, progress_factory=None):
        self.run = run
        self.plan = plan
        self.lr_schedule = lr_schedule
        self.start_step = start_step
        self.records: dict[int, dict] = {}
        self.steps_this_run = 0
        """Steps this process trained (not forced repeats): the rate and the ETA count them."""
        self._progress_factory = progress_factory or StepProgress
        self._progress = None
        self._t_start = None
        self._written: dict[int, dict] | None = None  # what the file holds (None: rewrite it on the next flush)
        self._last_flush = 0.0
        self._examples = np.array(
            [sum(len(r) for r in plan.rows[s * plan.rows_per_step : (s + 1) * plan.rows_per_step]) for s in range(plan.steps)]
        )
        self._tokens = plan.step_real_tokens
        if start_step > 0:
            self.records = {rec["step"]: rec for rec in run.read_metrics() if rec["step"] <= start_step}

    def start(self) -> None:
        self._t_start = time.time()
        if distributed.is_writer():  # on a pod, one progress line (process 0's), not one per host
            self._progress = self._progress_factory(self.plan.steps, self.start_step)

    def on_step(self, info: StepInfo, force: bool = False):
        step = info.step + 1  # updates done
        if step in self.records and force:
            return
        loss = float(info.loss)
        rec = {
            "step": step,
            "loss": loss,
            "step_seconds": round(float(info.step_duration), 6),
            "loss_tokens": int(self.plan.step_tokens[info.step]),
            "examples": int(self._examples[info.step]),
            "tokens": int(self._tokens[info.step]),
            "learning_rate": float(self.lr_schedule(info.step)),
            "time": round(time.time(), 3),
        }
        self.records[step] = rec
        if not force:
            self.steps_this_run += 1
        elapsed = time.time() - (self._t_start or time.time())
        steps = range(self.start_step, step)
        ex = float(sum(self._examples[s] for s in steps))
        tok = float(sum(self._tokens[s] for s in steps))
        rate = self.steps_this_run / elapsed if elapsed > 0 else 0.0
        eta = (self.plan.steps - step) / rate if rate > 0 else float("inf")
        if self._progress is not None:
            self._progress.update(step, loss, ex / elapsed if elapsed else 0.0, tok / elapsed if elapsed else 0.0, eta)
        if not io.is_remote(self.run.metrics_path) or time.time() - self._last_flush >= self.remote_flush_seconds:
            self.flush()

    def add(self, step: int, **fields) -> None:
        rec = dict(self.records.get(step, {"step": step}))
        rec.update(fields)
        self.records[step] = rec  # a new object, so flush() rewrites the file

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.message(text)
        else:
            logger.info(text)

    def flush(self) -> None:
        """Write what is new. Local files get appended lines; object stores get the whole file again."""
        if not distributed.is_writer() or not self.records:
            return
        self._last_flush = time.time()
        steps = sorted(self.records)
        if io.is_remote(self.run.metrics_path) or self._written is None or any(
            self.records[k] is not self._written.get(k) for k in steps if k in self._written
        ):
            text = "".join(json.dumps(self.records[k]) + "\n" for k in steps)
            io.write_text_atomic(self.run.metrics_path, text)
        else:
            new = [k for k in steps if k not in self._written]
            if new:
                with open(self.run.metrics_path, "a") as f:
                    f.write("".join(json.dumps(self.records[k]) + "\n" for k in new))
        self._written = {k: self.records[k] for k in steps}

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.flush()

    def before_checkpoints_of(self, checkpointer) -> None:
        """Flush before every checkpoint `checkpointer` saves: a checkpoint is only complete once the metrics of
        the steps it covers are in the run directory (a resume keeps those lines and rewrites the rest)."""
        save = checkpointer.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            self.flush()
            return save(*args, **kwargs)

        checkpointer.save_checkpoint = save_checkpoint


class CheckpointRetention(Callback):
    """Deletes this run's checkpoints beyond the newest `keep` (0 keeps all), on the writer. Only sealed checkpoints
    count (core/checkpoints.py: sealed once whole), so the newest whole one is never the one being deleted and an
    interrupted save always leaves an older whole checkpoint behind; each deletion unseals first, so one cut short
    never looks whole. (A 7B checkpoint with Adam state is ~81 GB.) It looks at the run directory only after a
    checkpoint was sealed (`sealed`), and once at the start and the end: a listing on every step would put the
    writer's object-store latency between every two steps of the other hosts."""

    def __init__(self, run: RunDir, keep: int):
        self.run, self.keep = run, keep
        self._new_seal = True

    def sealed(self) -> None:
        self._new_seal = True

    def on_step(self, info: StepInfo, force: bool = False):
        if self.keep <= 0 or not distributed.is_writer() or not (self._new_seal or force):
            return
        self._new_seal = False
        sealed = sealed_checkpoints(self.run)
        for old in sealed[: max(0, len(sealed) - self.keep)]:
            logger.debug("Deleting checkpoint %s (keeping the newest %d)", old.path, self.keep)
            try:
                delete_checkpoint(old.path)
            except FileNotFoundError:  # Levanter removed it first (a temporary checkpoint)
                pass


class ManifestHook(Callback):
    """Records progress (step, loss, last checkpoint) in the manifest every minute and at the end."""

    def __init__(self, run: RunDir, plan: Plan, metrics: MetricsHook, every_seconds: float = 60.0):
        self.run, self.plan, self.metrics = run, plan, metrics
        self.every = every_seconds
        self._last = time.time()

    def on_step(self, info: StepInfo, force: bool = False):
        if not force and time.time() - self._last < self.every:
            return
        self._last = time.time()
        self.metrics.flush()
        last = latest_checkpoint(self.run)
        self.run.train.progress = TrainProgress(
            step=info.step + 1,
            total_steps=self.plan.steps,
            loss=float(info.loss),
            last_checkpoint=self.run.relative(last) if last else None,
        )
        report(self.run.train, info.step + 1)
        self.run.touch("train")


class EvalHook(Callback):
    """Token-mean loss on the held-out rows, logged to metrics.jsonl (`val_loss`) and the tracker."""

    def __init__(self, trainer, dataset, real_vocab: int, metrics: MetricsHook, batch_rows: int):
        import haliax as hax
        import jax.numpy as jnp

        from alpaca_cli.core.batches import row_activations, token_losses

        self.trainer, self.dataset, self.metrics = trainer, dataset, metrics
        self.Batch = hax.Axis(trainer.config.batch_axis_name, batch_rows)
        self._done: set[int] = set()
        mp = trainer.mp

        @hax.named_jit(axis_resources=trainer.compute_axis_mapping)
        def sums(model, row):
            model = mp.cast_to_compute(model)
            act, _ = row_activations(model, row)
            per_token = token_losses(model, act, row.tokens, row.weights > 0, real_vocab)
            return hax.sum(per_token * row.weights).scalar(), hax.sum(row.weights).scalar().astype(jnp.float32)

        self._sums = sums

    def evaluate(self, model) -> float:
        model = for_inference(model)  # the held-out loss without dropout, as `alpaca eval` computes it
        total, count = 0.0, 0.0
        loader = self.trainer.data_loader(self.dataset, self.Batch)
        for batch in loader:
            s, c = self._sums(model, batch)
            total += float(s)
            count += float(c)
        return total / count if count else float("nan")

    def on_step(self, info: StepInfo, force: bool = False):
        step = info.step + 1
        if step in self._done:
            return
        self._done.add(step)
        val = self.evaluate(info.eval_model)
        import levanter

        levanter.tracker.log({"eval/loss": val}, step=info.step)
        self.metrics.add(step, val_loss=val)
        self.metrics.message(f"step {step}: held-out loss {val:.4f}")


class PreemptionHook(Callback):
    """SIGTERM (how TPU VMs, SLURM and Kubernetes announce a preemption): finish the current step, save a
    checkpoint, stop. On a pod the decision is collective: any host's SIGTERM stops every host at the same step."""

    def __init__(self, checkpointer):
        import signal
        import threading

        self.checkpointer = checkpointer
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def close(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_step(self, info: StepInfo, force: bool = False):
        interrupts.check()  # a Ctrl-C whose KeyboardInterrupt was swallowed stops here, at the latest
        stop = self.requested
        if distributed.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
        if not stop or force:
            return
        save_now(self.checkpointer, info)
        self.checkpointer.wait_until_finished()
        from alpaca_cli.errors import StageError

        raise StageError(
            f"stopped by SIGTERM after step {info.step + 1}; its checkpoint (step-{info.step}) is saved",
            hint="run the same command again (on every host) to resume",
        )


def fire_from_the_first_step(trainer) -> None:
    """Run the trainer's hooks after every step whose number is a multiple of their `every`, from step 0.

    Upstream symptom (marin-levanter 0.2.20, levanter/trainer.py:129, `TrainerHooks.run_hooks`): hooks run only when
    `info.step > 1`, so the first two steps had no metrics line, no progress and no eval, and a resume lost two
    more. This restores the rule of levanter 1.2 (`force or step % every == 0`); remove it when upstream does.
    """
    hooks = trainer.hooks

    def run_hooks(info, force: bool = False):
        for hook in hooks.hooks:
            if force or info.step % hook.every == 0:
                hook.fn.on_step(info, force=force)

    hooks.run_hooks = run_hooks
