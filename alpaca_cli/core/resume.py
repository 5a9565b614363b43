"""Resuming a run, on this machine or another: what must stay the same (the plan's inputs), and the machines a run
has trained on (its segments).

The plan (core/plan.py) does not depend on the machine, and Levanter restores a checkpoint onto whatever mesh the
trainer has, so a run resumes on another device count, host count, tensor-parallel size or rows per device with the
same examples in the same steps. What decides the plan cannot change: a resume that changes it is refused, naming
the setting and both values.
"""

from __future__ import annotations

import json

from alpaca_cli.config import TRAIN_FLAGS
from alpaca_cli.errors import StageError
from alpaca_cli.records import PlanRecord, TrainRecord, TrainSegment
from alpaca_cli.rundir import now

_DERIVED = {"rows_per_step": "rows per step", "plan_steps": "steps"}
"""Plan inputs computed from the others: they differ alone only when another alpaca version planned the run."""


def check_same_plan(url: str, old: dict | None, new: dict) -> None:
    """Refuse to resume the run at url when what decides its plan changed (old: the record's plan_inputs)."""
    if old is None:  # a record from before plan_inputs were kept
        raise StageError(f"run {url} was trained with a different plan (by an earlier alpaca, or other settings)",
                         hint="resume it with the alpaca version and settings that started it, or use a new --run-dir")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in _DERIVED]
    if changed:
        key = changed[0]
        if key == "prepared":
            what = "on other prepared data (alpaca prepare ran again on this run directory since)"
        else:
            what = f"with {_name(key)} {_show(old.get(key))}, now {_show(new.get(key))}"
        raise StageError(f"run {url} was trained {what}",
                         hint="resume it with the same settings (any devices, hosts or --tensor-parallel), "
                              "or use a new --run-dir")
    derived = [k for k in _DERIVED if old.get(k) != new.get(k)]
    if derived:
        k = derived[0]
        raise StageError(f"run {url} was planned with {old.get(k)} {_DERIVED[k]}, the same settings now give "
                         f"{new.get(k)} (another alpaca version's planner)",
                         hint="resume it with the alpaca version that started it, or use a new --run-dir")


def _name(key: str) -> str:
    if key == "lora":
        return "LoRA settings"
    return TRAIN_FLAGS.named(key)


def _show(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "none" if value is None else str(value)


def machine(summary: PlanRecord, step: int) -> TrainSegment:
    """A segment that starts at `step` (updates done) on the machine `summary` was planned for."""
    return TrainSegment(start_step=step, end_step=step, devices=summary.devices, hosts=summary.hosts,
                        tensor_parallel=summary.mesh.tensor_parallel, platform=summary.platform, started=now())


def describe(seg: TrainSegment) -> str:
    """'4 devices x 1 host' (with the tensor-parallel size when there is one)."""
    text = f"{seg.devices} device{'s' * (seg.devices != 1)} x {seg.hosts} host{'s' * (seg.hosts != 1)}"
    return text + (f", tensor parallel {seg.tensor_parallel}" if seg.tensor_parallel > 1 else "")


def same_machine(a: TrainSegment, b: TrainSegment) -> bool:
    return (a.devices, a.hosts, a.tensor_parallel) == (b.devices, b.hosts, b.tensor_parallel)


def start_segment(record: TrainRecord, previous: list[TrainSegment], step: int, summary: PlanRecord) -> str | None:
    """Set the record's segments for training that starts after `step` updates on the machine of `summary`: the
    previous segments that trained steps up to that one, each ending where the next starts, then this one.
    Returns the line that says what resumes where (None for a fresh start)."""
    here = machine(summary, step)
    kept = [s for s in previous if s.start_step < step] if step else []
    for s, later in zip(kept, [*kept[1:], here]):
        s.end_step = later.start_step  # what it trained past the checkpoint the next one starts from is redone
    record.segments = [*kept, here]
    if not step:
        return None
    line = f"Resuming from the checkpoint after step {step} of {summary.steps}"
    if not kept:
        return line
    if same_machine(kept[-1], here):
        return f"{line} (written on this machine's mesh: {describe(here)})"
    return f"{line}, written on {describe(kept[-1])}, now {describe(here)}"


def note(record: TrainRecord | None, inputs: dict, checkpoint_updates: int | None, summary: PlanRecord) -> str | None:
    """For a dry run: what a train on this machine would resume (None when it would start fresh)."""
    if record is None or checkpoint_updates is None or record.plan_inputs != inputs:
        return None
    before = record.segments[-1] if record.segments else None
    line = f"from the checkpoint after step {checkpoint_updates} of {summary.steps}"
    if before is not None:
        line += f", written on {describe(before)}; this machine: {describe(machine(summary, 0))}"
    return line


def report(record: TrainRecord, step: int) -> None:
    """Training reached `step` updates: the current segment ends there."""
    if record.segments:
        record.segments[-1].end_step = step
