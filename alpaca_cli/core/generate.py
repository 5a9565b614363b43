"""`alpaca generate`: responses from the fine-tuned model, prompted with the run's template.

Decoding re-runs the model over the whole (padded) sequence for every new token: one compiled program per batch
shape, no cache. That is quadratic in the length, which is fine for trying a model and for evaluation sets of a few
hundred prompts; it is not a serving engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from alpaca_cli import io
from alpaca_cli.config import PromptTemplates
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core.prompts import PROMPTS_FILE
from alpaca_cli.core.logits import model_logits
from alpaca_cli.core.mesh import COMPUTE, FSDP, local_mesh
from alpaca_cli.errors import ConfigError, DataError
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class Request:
    instruction: str
    input: str = ""


@dataclass
class Generator:
    model: object
    tokenizer: object
    templates: PromptTemplates
    max_len: int
    mesh: object

    def generate(
        self, requests: Sequence[Request], *, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
        batch_size: int = 8,
    ) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), batch_size):
            out.extend(self._batch(requests[start : start + batch_size], max_new_tokens, temperature, seed + start))
        return out

    def _batch(self, requests, max_new_tokens, temperature, seed) -> list[str]:
        import haliax as hax
        import jax
        import jax.numpy as jnp
        from levanter.layers.attention import AttentionMask

        tok = self.tokenizer
        prompts = [promptsmod.render(self.templates, r.instruction, r.input) for r in requests]
        encoded = [tok(p)["input_ids"] for p in prompts]
        longest = max(len(e) for e in encoded)
        if longest >= self.max_len:
            raise DataError(f"a prompt is {longest} tokens long; the model's rows hold {self.max_len}")
        total = min(self.max_len, longest + max_new_tokens)
        width = min(self.max_len, 64 * math.ceil(total / 64))  # a few shapes only: one compile per bucket
        B = len(requests)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.full((B, width), pad, dtype=np.int32)
        lengths = np.array([len(e) for e in encoded], dtype=np.int32)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
        Batch, Pos = hax.Axis("batch", B), self.model.Pos.resize(width)

        @hax.named_jit
        def next_logits(model, tokens, at):
            logits = model_logits(model, tokens, AttentionMask.causal()).rearrange(("batch", "position", "vocab"))
            return jnp.take_along_axis(logits.array, at[:, None, None], axis=1)[:, 0, :]

        key = jax.random.PRNGKey(seed)
        done = np.zeros(B, dtype=bool)
        start_lengths = lengths.copy()
        real_vocab = len(tok)
        with hax.partitioning.set_mesh(self.mesh), hax.axis_mapping(COMPUTE):
            for _ in range(total - int(lengths.min())):
                if done.all():
                    break
                tokens = hax.named(jnp.asarray(ids), (Batch, Pos))
                logits = np.asarray(next_logits(self.model, tokens, jnp.asarray(lengths - 1)))[:, :real_vocab]
                if temperature > 0:
                    key, sub = jax.random.split(key)
                    nxt = np.asarray(jax.random.categorical(sub, jnp.asarray(logits) / temperature, axis=-1))
                else:
                    nxt = logits.argmax(-1)
                for b in range(B):
                    if done[b]:
                        continue
                    if lengths[b] >= width or lengths[b] - start_lengths[b] >= max_new_tokens:
                        done[b] = True
                        continue
                    ids[b, lengths[b]] = nxt[b]
                    lengths[b] += 1
                    if nxt[b] == tok.eos_token_id or lengths[b] - start_lengths[b] >= max_new_tokens:
                        done[b] = True
        return [
            tok.decode(ids[b, start_lengths[b] : lengths[b]].tolist(), skip_special_tokens=True) for b in range(B)
        ]


def load_generator(run: RunDir | None, *, from_export: str | None = None, step: int | None = None) -> Generator:
    """The fine-tuned model from the run's checkpoint (Levanter) or from an exported Hugging Face folder."""
    import haliax as hax
    from transformers import AutoTokenizer

    mesh = local_mesh(all_devices=True)
    mapping = FSDP
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
        if from_export:
            from alpaca_cli.core.models import open_base_model

            with open_base_model(from_export) as base:
                with io.local_dir(from_export) as local:
                    tok = AutoTokenizer.from_pretrained(local)
                    templates = _templates_from_export(local, run)
                seq_len = base.context_length or 2048
                lev_config = base.lev_config(seq_len)
                model = base.converter(tok).load_pretrained(
                    lev_config.model_type, ref=base.ref, config=lev_config, axis_mapping=mapping,
                    resize_vocab_to_match_tokenizer=False,
                )
                max_len = seq_len
        else:
            from alpaca_cli.core.checkpoints import find_checkpoint, load_model

            assert run is not None
            tok = run.load_tokenizer()
            model, lev_config, hf_config = load_model(run, find_checkpoint(run, step), tokenizer=tok,
                                                      axis_mapping=mapping, mesh=mesh)
            templates = run.require_prepare().config.prompts
            max_len = lev_config.seq_len
    return Generator(model=model, tokenizer=tok, templates=templates, max_len=max_len, mesh=mesh)


def _templates_from_export(folder: str, run: RunDir | None) -> PromptTemplates:
    path = os.path.join(folder, PROMPTS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return PromptTemplates(**json.load(f))
    if run is not None and run.is_complete("prepare"):
        return run.require_prepare().config.prompts
    logger.warning("%s has no %s; using Stanford's templates", folder, PROMPTS_FILE)
    return PromptTemplates()


def read_requests(path: str) -> list[Request]:
    """Records with `instruction` and optional `input` (JSONL, or a JSON list), e.g. an AlpacaEval set."""
    try:
        text = io.read_text(path)
    except FileNotFoundError:
        raise DataError(f"--file {path}: no such file") from None
    rows: list = []
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
        where = [f"record {i}" for i in range(len(rows))]
    else:
        where = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: malformed JSON ({e.msg})") from None
                where.append(f"line {n}")
    out = []
    for w, r in zip(where, rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(f"{path} {w}: needs a string `instruction`")
        if not isinstance(r.get("input", ""), str):
            raise DataError(f"{path} {w}: `input` must be a string")
        out.append(Request(r["instruction"], r.get("input", "")))
    if not out:
        raise DataError(f"--file {path}: holds no records")
    return out


def check_args(max_new_tokens: int, temperature: float) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"--temperature must be >= 0, got {temperature}")
    if problems:
        raise ConfigError(problems)
