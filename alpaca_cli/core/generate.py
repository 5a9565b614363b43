"""`alpaca generate`: answers from the fine-tuned model (or an export, or the base model), prompted with the run's
template, decoded in batches with a KV cache (core/decode.py).

A run prepared from conversations is served with the chat template it trained with (core/served_template.py): a
conversation (`--messages`) is rendered with add_generation_prompt=True, an instruction becomes its user message, and
an answer ends at EOS or the template's end-of-turn token. A run of Alpaca records formats instructions with its
prompts, as today, and renders conversations with the template its export ships.

A file of requests is answered in batches of similar prompt lengths; each finished batch is appended to a progress
file beside the output, so a killed run continues where it stopped (nothing generated twice, nothing lost) and the
output appears whole, at the end, in the format its name asks for: `.json` is AlpacaEval's (a list of
{"instruction", "output", "generator"}), `.jsonl` one such object per line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from alpaca_cli import interrupts, io
from alpaca_cli.config import Decoding, PromptTemplates
from alpaca_cli.core import decode
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core import served_template as served
from alpaca_cli.core.logits import for_inference
from alpaca_cli.core.mesh import COMPUTE, FSDP, local_mesh, pod_mesh
from alpaca_cli.core.prompts import PROMPTS_FILE
from alpaca_cli.errors import ConfigError, DataError
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = (".json", ".jsonl")
EXPORT_AGAIN = "export it again (`alpaca export --run-dir RUN --output DIR`), or copy the whole export again"


@dataclass
class Request:
    instruction: str
    input: str = ""
    extra: dict = field(default_factory=dict)
    """Other fields of the request's record that the output keeps (AlpacaEval's `dataset`, say)."""
    messages: Optional[list] = None
    """A conversation whose next assistant turn is the answer (instead of the instruction)."""


@dataclass
class Answer:
    text: str
    finish: str
    """decode.EOS (the model ended its answer: EOS or the template's end-of-turn token) or decode.LENGTH (cut at
    max_new_tokens or the context)."""
    new_tokens: int


@dataclass
class Generator:
    model: object
    tokenizer: object
    templates: PromptTemplates
    max_len: int
    mesh: object
    chat_template: Optional[str] = None
    """The chat template a conversation run trained with (None: Alpaca records, prompted with `templates`)."""

    def __post_init__(self):
        self.model = for_inference(self.model)  # answers and scores with dropout off, whatever the model's config
        self._end: Optional[served.EndOfTurn] = None
        self._alpaca_template: Optional[str] = None

    @property
    def served_template(self) -> str:
        """The template conversations are rendered with: the run's, or for Alpaca records the one its export ships."""
        if self.chat_template is not None:
            return self.chat_template
        if self._alpaca_template is None:
            self._alpaca_template = promptsmod.chat_template(self.templates, bos=promptsmod.adds_bos(self.tokenizer))
        return self._alpaca_template

    @property
    def end(self) -> served.EndOfTurn:
        """What ends an answer: EOS, and the end-of-turn token of the template a conversation run trained with."""
        if self._end is None:
            eos = self.tokenizer.eos_token_id
            self._end = (served.end_of_turn(self.tokenizer, self.chat_template) if self.chat_template is not None
                         else served.EndOfTurn((eos,) if eos is not None else ()))
        return self._end

    @property
    def eos_ids(self) -> list[int]:
        return list(self.end.ids)

    def prompt_ids(self, r: Request) -> list[int]:
        if r.messages is not None:
            return served.prompt_ids(self.tokenizer, self.served_template, r.messages)
        if self.chat_template is not None:  # a conversation run: the instruction is the user's message
            return served.prompt_ids(self.tokenizer, self.chat_template, [served.instruction_message(r.instruction,
                                                                                                      r.input)])
        return self.tokenizer(promptsmod.render(self.templates, r.instruction, r.input))["input_ids"]

    def generate(self, requests: Sequence[Request], decoding: Decoding, *, request_ids: Sequence[int] | None = None,
                 on_batch: Callable[[list[tuple[int, Answer]]], None] | None = None) -> list[Answer]:
        """Answer every request. Requests are batched by prompt length (fewer shapes to compile, less padding);
        on_batch gets each finished batch as (position in `requests`, answer) pairs."""
        import haliax as hax

        ids = [self.prompt_ids(r) for r in requests]
        rows = min(decoding.batch_size, len(requests)) or 1  # one request is decoded alone, not among empty rows
        for i, p in enumerate(ids):
            if len(p) >= self.max_len:
                raise DataError(f"request {i} is {len(p)} tokens long; the model's rows hold {self.max_len}",
                                hint="shorten it, or train with a longer --seq-len")
        rids = list(request_ids) if request_ids is not None else list(range(len(requests)))
        order = sorted(range(len(requests)), key=lambda i: len(ids[i]))
        answers: list[Answer | None] = [None] * len(requests)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with hax.partitioning.set_mesh(self.mesh), hax.axis_mapping(COMPUTE):
            self.model = decode.layout_for(self.model, rows)
            for start in range(0, len(order), rows):
                interrupts.check()
                chunk = order[start : start + rows]
                gens = self._decode([ids[i] for i in chunk], [rids[i] for i in chunk], decoding, rows, pad)
                done = []
                for i, g in zip(chunk, gens):
                    answers[i] = self.answer(g)
                    done.append((i, answers[i]))
                if on_batch is not None:
                    on_batch(done)
        return answers  # type: ignore[return-value]

    def answer(self, g: decode.Generation) -> Answer:
        """A decoded answer's text, without the token that ended it (EOS or end-of-turn) and special tokens."""
        tokens, stopped = self.end.finish(g.tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not stopped and self.chat_template is not None and self.end.text and self.end.text in text:
            text, stopped = text[: text.index(self.end.text)], True  # a closing text of several tokens
        return Answer(text=text, finish=decode.EOS if stopped else g.finish, new_tokens=len(g.tokens))

    def _decode(self, prompts, rids, d: Decoding, rows: int, pad: int) -> list[decode.Generation]:
        kwargs = dict(max_new_tokens=d.max_new_tokens, max_len=self.max_len, eos_ids=self.eos_ids,
                      temperature=d.temperature, top_p=d.top_p, seed=d.seed, request_ids=rids, pad_id=pad,
                      real_vocab=len(self.tokenizer))
        if decode.supports(self.model):
            return decode.generate(self.model, prompts, batch_size=rows, **kwargs)
        return decode.generate_uncached(self.model, prompts, **kwargs)


def load_generator(run: RunDir | None, *, from_export: str | None = None, step: int | None = None,
                   base: bool = False) -> Generator:
    """The fine-tuned model from the run's checkpoint (final, or step), an exported Hugging Face folder, or (base)
    the run's base model as training started from it ([PAD] rows added as training adds them)."""
    import haliax as hax

    from alpaca_cli import distributed

    # several processes (a pod's hosts): one mesh over all their devices, every process running the same steps
    mesh = pod_mesh() if distributed.process_count() > 1 else local_mesh(all_devices=True)
    if distributed.process_count() > 1:
        logger.info("the model sharded over %d devices of %d processes", mesh.devices.size, distributed.process_count())
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(FSDP):
        if from_export:
            from alpaca_cli.core.models import check_weights, open_base_model

            with open_base_model(from_export, "--from-export") as model_folder, io.local_dir(from_export) as local:
                check_weights(model_folder, f"--from-export {from_export}", hint=EXPORT_AGAIN)
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(local)
                templates, chat = _templates_from_export(local, run, tok)
                max_len = _exact_length(model_folder, model_folder.context_length or 2048)
                lev_config = model_folder.lev_config(max_len)
                model = model_folder.converter(tok).load_pretrained(
                    lev_config.model_type, ref=model_folder.ref, config=lev_config, axis_mapping=FSDP,
                    resize_vocab_to_match_tokenizer=False,
                )
        elif base:
            from alpaca_cli.core.models import base_model_as_trained, open_base_model

            assert run is not None
            tok = run.load_tokenizer()
            templates, chat = run.require_prepare().config.prompts, run.require_prepare().chat_template
            train = run.require_train()
            with open_base_model(train.inputs.model) as model_folder:
                max_len = _exact_length(model_folder, train.plan.seq_len)
                model = base_model_as_trained(model_folder, max_len, tok, run.require_prepare().summary.added_tokens)
        else:
            from alpaca_cli.core.checkpoints import find_checkpoint, load_model

            assert run is not None
            tok = run.load_tokenizer()
            model, lev_config, _ = load_model(run, find_checkpoint(run, step), tokenizer=tok, axis_mapping=FSDP,
                                              mesh=mesh)
            templates, chat = run.require_prepare().config.prompts, run.require_prepare().chat_template
            max_len = lev_config.max_seq_len
    return Generator(model=model, tokenizer=tok, templates=templates, max_len=max_len, mesh=mesh, chat_template=chat)


def _exact_length(model_folder, length: int) -> int:
    """At most the length the Levanter model computes like transformers (a sliding window it lacks)."""
    from alpaca_cli.core.families import sliding_window_limit

    window = sliding_window_limit(model_folder.hf_config)
    return min(length, window) if window else length


def _templates_from_export(folder: str, run: RunDir | None, tok) -> tuple[PromptTemplates, Optional[str]]:
    """The prompts and chat template an export is served with: an export of Alpaca records carries its prompts
    (PROMPTS_FILE); one of a conversation run carries only its chat template (the one it trained with)."""
    path = os.path.join(folder, PROMPTS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return PromptTemplates(**json.load(f)), None
    if run is not None and run.is_complete("prepare"):
        return run.require_prepare().config.prompts, run.require_prepare().chat_template
    if getattr(tok, "chat_template", None):
        return PromptTemplates(), tok.chat_template
    logger.warning("%s has no %s; using Stanford's templates", folder, PROMPTS_FILE)
    return PromptTemplates(), None


# -- files of requests -----------------------------------------------------------------------------------------------


def read_requests(path: str) -> list[Request]:
    """Records with `instruction` and optional `input`: Alpaca records, or AlpacaEval's eval set (whose
    `instruction` already holds any input). JSON list or JSON Lines, local or remote, gzip allowed."""
    from alpaca_cli.core.data import read_rows

    rows = read_rows(path, "--file")
    out = []
    for where, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(f"{path} {where}: needs a string `instruction`")
        if not isinstance(r.get("input", ""), str):
            raise DataError(f"{path} {where}: `input` must be a string")
        extra = {k: v for k, v in r.items() if k not in ("instruction", "input", "output", "generator")}
        out.append(Request(r["instruction"], r.get("input") or "", extra))
    if not out:
        raise DataError(f"--file {path}: holds no records")
    return out


def read_message_requests(path: str) -> list[Request]:
    """--messages: one conversation or a file of them (served_template.read_conversations), each a request whose
    answer is the next assistant turn; a final assistant message is its reference (kept in the output)."""
    out = []
    for messages in served.read_conversations(path):
        prompt, reference = served.split_reference(messages)
        if not prompt:
            raise DataError(f"--messages {path}: a conversation holds only an assistant message; nothing to answer")
        out.append(Request("", messages=prompt, extra={"reference": reference} if reference is not None else {}))
    return out


def output_record(r: Request, a: Answer, generator: str) -> dict:
    """AlpacaEval's model-output format: the instruction verbatim, the output, the generator's name (a
    conversation's request: its messages in place of the instruction)."""
    if r.messages is not None:
        return {"messages": r.messages, "output": a.text, "generator": generator, **r.extra}
    rec = {"instruction": r.instruction}
    if r.input:
        rec["input"] = r.input
    rec.update(output=a.text, generator=generator, **r.extra)
    return rec


def check_output(output: str, requests_file: str, generator: str) -> None:
    """Refuse an --output that answer_file would replace although generate did not write it: the --file itself, or
    an existing file that is not an earlier output of this generator (the format answer_file writes, every record's
    `generator` this one). An empty file holds nothing to lose; an earlier output is answered again as before."""
    if _same_file(output, requests_file):
        raise ConfigError(f"--output {output} is the --file it would answer", hint="write the answers to another file")
    if not io.exists(output):
        return
    try:
        text = io.read_text(output)
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None and (not text.strip() or _is_output_of(text, output, generator)):
        return
    raise ConfigError(f"--output {output} already exists and is not an earlier output of generator {generator!r}",
                      hint="give another --output, or delete that file yourself")


def _same_file(a: str, b: str) -> bool:
    a, b = io.normalize(a), io.normalize(b)
    if io.is_remote(a) or io.is_remote(b) or not (os.path.exists(a) and os.path.exists(b)):
        return a == b
    return os.path.samefile(a, b)


def _is_output_of(text: str, output: str, generator: str) -> bool:
    """Whether text is what answer_file writes for this generator: a JSON list (.json) or JSON Lines (.jsonl) of
    records with a string instruction and output and this `generator`."""
    try:
        lines = [json.loads(x) for x in text.splitlines() if x.strip()] if output.endswith(".jsonl") else None
        records = json.loads(text) if lines is None else lines
    except json.JSONDecodeError:
        return False
    return isinstance(records, list) and all(
        isinstance(r, dict) and (isinstance(r.get("instruction"), str) or isinstance(r.get("messages"), list))
        and isinstance(r.get("output"), str) and r.get("generator") == generator for r in records)


def _same_request(rec: dict, r: Request) -> bool:
    """Whether a progress line answered this request (its instruction, or its conversation)."""
    if r.messages is not None:
        return rec.get("messages") == r.messages
    return rec.get("instruction") == r.instruction


def answer_file(gen: Generator, requests: list[Request], decoding: Decoding, output: str, generator: str,
                progress=None) -> tuple[int, int]:
    """Answer a file of requests into `output` (.json or .jsonl), resumable. Returns (answered now, resumed).

    Progress goes to OUTPUT.partial.jsonl (one line per finished request, with its index and the decoding that made
    it) as batches finish; a rerun with the same requests and decoding skips what is there. The output is written
    whole at the end (atomically), then the progress file is removed.
    Several processes: all of them generate (in step), process 0 alone reads and writes the files."""
    from alpaca_cli import distributed

    if not output.endswith(OUTPUT_FORMATS):
        raise ConfigError(f"--output {output}: use a .json (AlpacaEval) or .jsonl file name")
    writer = distributed.is_writer()
    progress = progress if writer else None
    partial = output + ".partial.jsonl"
    key = {"decoding": {k: getattr(decoding, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
           "generator": generator}
    done: dict[int, dict] = {}
    if writer and io.exists(partial):
        for line in io.read_text(partial).splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if rec.get("key") == key and 0 <= rec.get("index", -1) < len(requests) and \
                    _same_request(rec, requests[rec["index"]]):
                done[rec["index"]] = rec
    # what process 0 found, on every process: they must decode the same requests
    done = {int(i): rec for i, rec in distributed.broadcast({str(i): rec for i, rec in done.items()}).items()}
    todo = [i for i in range(len(requests)) if i not in done]
    resumed = len(done)
    if resumed:
        logger.info("Continuing %s: %d of %d requests already answered", output, resumed, len(requests))
    if progress is not None:
        progress.start("Generating", len(requests))
        progress.advance(resumed)
    lines = [json.dumps(done[i]) + "\n" for i in sorted(done)]

    def on_batch(batch):
        for j, a in batch:
            i = todo[j]
            rec = {"index": i, "key": key, **output_record(requests[i], a, generator), "finish": a.finish}
            done[i] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if writer:
            io.write_text_atomic(partial, "".join(lines))  # whole lines only, even if killed mid-write
        if progress is not None:
            progress.advance(len(batch))

    try:
        if todo:
            gen.generate([requests[i] for i in todo], decoding, request_ids=todo, on_batch=on_batch)
    finally:
        if progress is not None:
            progress.stop()
    records = [{k: v for k, v in done[i].items() if k not in ("index", "key", "finish")} for i in range(len(requests))]
    if not writer:
        return len(todo), resumed
    if output.endswith(".json"):
        io.write_text_atomic(output, json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    else:
        io.write_text_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    io.rm_tree(partial)
    return len(todo), resumed
