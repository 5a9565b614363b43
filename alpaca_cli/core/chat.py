"""Conversations: record formats, chat templates, and the assistant-only label rule.

Formats. A record is an Alpaca record (instruction / input / output), a `messages` list of {role, content} (OpenAI,
Hugging Face) or a ShareGPT `conversations` list of {from, value}; `detect_format` tells them apart by their fields
and `to_messages` turns the last two into one list of {role, content} messages.

Templates. A conversation is rendered by a Jinja chat template (Hugging Face's format) with transformers' own Jinja
environment: the tokenizer's own `chat_template`, a file, or a built-in (`chatml`, `alpaca`).

Labels (the rule every part of alpaca shares). For assistant message i, P_i = render(messages[:i],
add_generation_prompt=True) and R_i = render(messages[:i+1]); the characters [len(P_i), len(R_i.rstrip())) of R_i
are what the assistant wrote in that turn: its content and what closes the turn (<|im_end|>, <|eot_id|>,
<end_of_turn>, </s>...), not the header before it nor the whitespace after the closing token. The full rendering
is tokenized once, without special tokens (templates write the BOS themselves), and a token is trained iff its
character span [s, e) is non-empty and intersects a trained span: what transformers' `return_assistant_tokens_mask`
gives for a template whose `{% generation %}` markers wrap the content and the closing token. (Offsets trimmed by a
post-processor: see `turn_mask`.)

A template is prefix-preserving for a conversation when the full rendering F starts with every R_i and every R_i
starts with its P_i. One that is not (Mistral moves the system prompt into the last user turn; Qwen3 drops the
<think> of earlier turns) rewrites earlier turns, so F holds a turn the model never produced in that form: such a
conversation becomes one example per trained assistant turn, R_i with only turn i trained, the turn in the context
the template gives it at that turn. It is counted (`ChatStats.split_conversations`); nothing is mis-masked
silently. A template whose R_i does not start with P_i cannot say where the assistant's text begins: the record is
refused with the reason.

The `alpaca` built-in renders a single-turn conversation exactly as Stanford's prompt_no_input + output + eos, and
such a conversation is tokenized by `core.tokenize.tokenize_examples`, Stanford's own label rule: the generic rule
above trains a token that straddles the prompt/response boundary (a byte-level ':"'), Stanford's does not, and
a single-turn conversation under `alpaca` must give exactly the labels of the same Alpaca record.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from alpaca_cli.errors import ConfigError, DataError, first_line

FORMATS = ("alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all", "last")
ON_OVERFLOW = ("truncate", "drop", "error")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # LLaMA-Factory's tool use: the model's call is its own (assistant) turn, the tool's answer is the tool's
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT's `from` values and the role each becomes."""

PASSED_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
"""Keys of a `messages` turn kept beside role and content (Llama-3.1's and Qwen's templates render tool calls,
Qwen3's the reasoning); anything else in a turn is not given to the template."""

# -- formats --------------------------------------------------------------------------------------------------------


def detect_format(row: Mapping, *, where: str = "record") -> str:
    """"messages" (a `messages` list), "sharegpt" (a `conversations` list) or "alpaca" (instruction / output)."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a record must be a JSON object, found {type(row).__name__}")
    if isinstance(row.get("messages"), list):
        first = row["messages"][0] if row["messages"] else None
        return "sharegpt" if isinstance(first, Mapping) and "from" in first else "messages"
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise DataError(
        f"{where}: cannot tell the format (fields present: {', '.join(sorted(map(str, row))) or 'none'})",
        hint="give `messages` [{role, content}], `conversations` [{from, value}] or instruction/output, "
        "or say --format",
    )


def to_messages(row: Mapping, fmt: str, *, where: str, field: str | None = None,
                need_assistant: bool = True) -> list[dict]:
    """The record's conversation as [{"role", "content"}] with roles system / user / assistant / tool, checked:
    known roles, string contents, at least one assistant turn (to train; a conversation to answer, need_assistant
    False, at least one message). `where` names the record in errors; `field` is the record's field holding the
    turns when it is not `messages` / `conversations`."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a record must be a JSON object, found {type(row).__name__}")
    if fmt == "messages":
        key, role_key, content_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif fmt == "sharegpt":
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise ConfigError(f"to_messages: format {fmt!r} is not a conversation format (messages, sharegpt)")
    if field is None and fmt == "sharegpt" and "conversations" not in row and "messages" in row:
        key = "messages"  # ShareGPT turns ({from, value}) under `messages`
    key = field or key
    turns = row.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: field `{key}` must be a list of turns, found {_json_type(turns)}")
    messages = []
    system = row.get("system") if fmt == "sharegpt" else None
    if isinstance(system, str) and system:  # LLaMA-Factory's ShareGPT keeps the system prompt beside the turns
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: `{key}[{j}]` must be an object with `{role_key}` and `{content_key}`, "
                            f"found {_json_type(turn)}")
        rk, ck = role_key, content_key
        if fmt == "sharegpt" and "from" not in turn and "role" in turn:  # ShareGPT lists written with role/content
            rk, ck = "role", "content"
        role = turn.get(rk)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: `{key}[{j}].{rk}` is {role!r}; known: {', '.join(roles)}")
        content = turn.get(ck)
        if content is None and fmt == "messages" and turn.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise DataError(f"{where}: `{key}[{j}].{ck}` must be a string, found {_json_type(content)}")
        message = {"role": roles[role], "content": content}
        if fmt == "messages":  # what the templates that render tools and reasoning read
            message.update((k, turn[k]) for k in PASSED_KEYS if turn.get(k) is not None)
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    return messages


def _json_type(v: Any) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", str: "a string"}
    return kinds.get(type(v), type(v).__name__)


# -- templates ------------------------------------------------------------------------------------------------------

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML as Hugging Face's chat-templating docs give it (Qwen's and many fine-tunes' format)."""

ALPACA_MARK = "{#- alpaca: Stanford Alpaca's prompt -#}"
"""The first line of the `alpaca` built-in (a Jinja comment: it renders nothing). A single-turn conversation under a
template that starts with it is tokenized with Stanford's rule (see the module docstring)."""


def alpaca_template(prompts=None, *, bos: bool = True) -> str:
    """The `alpaca` built-in for these Alpaca prompts (Stanford's by default), with the BOS written in front when
    the tokenizer adds one to text (as tokenizing an Alpaca record does)."""
    from alpaca_cli.config import PromptTemplates
    from alpaca_cli.core.prompts import chat_template

    return ALPACA_MARK + chat_template(prompts or PromptTemplates(), bos=bos)


BUILTIN_TEMPLATES = {"chatml": CHATML, "alpaca": alpaca_template(bos=True)}
"""Jinja text of the named templates. `alpaca` here is the Llama form (BOS in front); `resolve_template` gives the
form that fits the tokenizer."""

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """"chatml", "alpaca", "tokenizer" (its own chat_template) or the file it was read from."""
    text: str
    """The Jinja text, as used."""
    missing_tokens: tuple[str, ...] = ()
    """Special tokens the template writes that the tokenizer does not have as single tokens (chatml's on a base
    model); they would be tokenized as plain text unless added."""


def resolve_template(tok, spec: str | None, *, prompts=None) -> ChatTemplate:
    """The template a run uses: None -> the tokenizer's own chat_template (refused in one line when it has none);
    "chatml" / "alpaca" -> built-in (`alpaca` with `prompts`, Stanford's by default); else a Jinja file (local or
    gs://)."""
    if spec is None:
        text = getattr(tok, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one
            text = text.get("default")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                "the tokenizer has no chat template, so conversations cannot be rendered",
                hint="pass --chat-template FILE|chatml|alpaca (a Jinja file, ChatML, or Stanford's Alpaca prompt)",
            )
        return ChatTemplate("tokenizer", text)
    if spec == "chatml":
        missing = tuple(t for t in CHATML_TOKENS if len(tok(t, add_special_tokens=False)["input_ids"]) != 1)
        return ChatTemplate("chatml", CHATML, missing)
    if spec == "alpaca":
        from alpaca_cli.core.prompts import adds_bos

        return ChatTemplate("alpaca", alpaca_template(prompts, bos=adds_bos(tok)))
    return ChatTemplate(spec, _read_template_file(spec))


def _read_template_file(spec: str) -> str:
    from alpaca_cli import io

    url = spec if io.is_remote(spec) else os.path.expanduser(spec)
    try:
        text = io.read_text(url)
    except FileNotFoundError:
        raise ConfigError(f"--chat-template {spec}: no such file",
                          hint="give a Jinja file, or one of chatml, alpaca") from None
    except IsADirectoryError:
        raise ConfigError(f"--chat-template {spec}: is a directory, not a Jinja file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {spec}: cannot read ({first_line(e)})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {spec}: the file is empty")
    try:
        _compile(text)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateSyntaxError and friends
        raise ConfigError(f"--chat-template {spec}: not a valid Jinja template ({first_line(e)})") from None
    return text


def _compile(text: str):
    """transformers' own compiled template (its sandboxed environment, filters and `raise_exception`), cached."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text)


class Renderer:
    """Renders conversations as `tok.apply_chat_template(messages, chat_template=text, tokenize=False,
    add_generation_prompt=...)` does (same compiled template, same variables), without its per-call overhead; through
    apply_chat_template itself where transformers no longer has the compiler this uses."""

    def __init__(self, tok, text: str):
        self.tok, self.text = tok, text
        try:
            self.template = _compile(text)
        except ImportError:
            self.template = None
            return
        # Template.render(**variables) builds its context from the template's globals (a ChainMap, slow to copy)
        # and the variables; this builds the same context from a plain copy: a third of the time of a short render.
        self.globals = dict(self.template.globals)
        self.base = {**self.globals, **tok.special_tokens_map, "tools": None, "documents": None}

    def __call__(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        t = self.template
        if t is None:
            return self.tok.apply_chat_template(list(messages), chat_template=self.text, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        variables = {**self.base, "messages": list(messages), "add_generation_prompt": add_generation_prompt}
        context = t.environment.context_class(t.environment, variables, t.name, t.blocks, globals=self.globals)
        return t.environment.concat(t.root_render_func(context))


# -- labels ---------------------------------------------------------------------------------------------------------


@dataclass
class ChatStats:
    """Totals over conversations, for the prepare table; `merge` adds another's."""

    conversations: int = 0
    messages: int = 0
    roles: dict[str, int] = field(default_factory=dict)
    """Messages per role."""
    assistant_turns: int = 0
    trained_turns: int = 0
    """Assistant turns with at least one trained token in the examples kept."""
    trained_tokens: int = 0
    tokens: int = 0
    """Tokens of the examples kept (after truncation)."""
    examples: int = 0
    split_conversations: int = 0
    """Conversations the template does not render prefix-preservingly: one example per trained turn."""
    cut_in_turn: int = 0
    """Examples truncated inside a trained assistant turn (some of its tokens kept, some cut)."""
    turns_beyond_limit: int = 0
    """Trained assistant turns whose every token fell beyond --max-length (in examples kept or dropped)."""
    stanford_rule: int = 0
    """Single-turn conversations under the `alpaca` template, labelled by Stanford's rule."""

    def merge(self, other: "ChatStats") -> "ChatStats":
        for name in self.__dataclass_fields__:
            if name == "roles":
                for role, n in other.roles.items():
                    self.roles[role] = self.roles.get(role, 0) + n
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


@dataclass
class _Piece:
    """One example to be: its text and the character spans trained, one per assistant turn."""

    text: str
    spans: list[tuple[int, int]]
    split: bool = False


def conversation_pieces(render: Renderer | Callable, messages: Sequence[Mapping], *, train_on: str = "all",
                        where: str = "record") -> list[_Piece]:
    """The example(s) of one conversation: the full rendering with every trained turn's span, or, where the
    template is not prefix-preserving, one rendering R_i per trained turn.

    Cost: a conversation with A assistant turns renders 2A prefixes (P_i and R_i) plus the whole (only when it does
    not end with an assistant turn): O(A x length) characters of Jinja output, linear in the turns for train_on=last
    (P, R of the last turn and the whole). Nothing is tokenized here."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        trained = trained[-1:]
    renders: dict[tuple[int, bool], str] = {}

    def rendered(k: int, gen: bool) -> str:
        if (k, gen) not in renders:
            try:
                renders[k, gen] = render(messages[:k], add_generation_prompt=gen)
            except Exception as e:  # noqa: BLE001 - the template's raise_exception, or a Jinja error
                raise DataError(f"{where}: the chat template cannot render this conversation "
                                f"({type(e).__name__}: {first_line(e)})") from None
        return renders[k, gen]

    spans, turns = [], []
    for i in trained:
        p, r = rendered(i, True), rendered(i + 1, False)
        if not r.startswith(p):
            raise DataError(
                f"{where}: the chat template renders assistant message {i} differently from its generation prompt, "
                "so the characters the assistant wrote cannot be found",
                hint="use a template whose add_generation_prompt text is how it renders an assistant turn's start (a "
                "template that shows a message only while it is last, as Mistral-Instruct-v0.3 does the system "
                "prompt, cannot: leave those messages out, or pass --chat-template FILE)",
            )
        spans.append((len(p), len(r.rstrip())))
        turns.append(r)
    full = rendered(len(messages), False)
    if all(full.startswith(r) for r in turns):
        return [_Piece(full, spans)]
    return [_Piece(r, [span], split=True) for r, span in zip(turns, spans)]


def trained_mask(starts: np.ndarray, ends: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose non-empty character span [start, end) intersects one of the spans."""
    mask = np.zeros(len(starts), dtype=np.uint8)
    nonempty = ends > starts
    for a, b in spans:
        if b > a:
            mask |= (nonempty & (starts < b) & (ends > a)).astype(np.uint8)
    return mask


def turn_mask(encoding, a: int, b: int) -> np.ndarray:
    """The tokens of one trained span [a, b) of the encoding's text: from the first to the last token whose
    character span intersects it, each token's span taken back over any characters no token covers
    ([min(start, previous end), end)). Where every character belongs to a token (the tokenizers of chat models)
    that is the intersection rule of the module docstring. A post-processor that trims offsets (GPT-2's ByteLevel
    with trim_offsets) leaves the spaces a token holds uncovered, and a token of spaces with an empty span: such
    tokens are the assistant's where they stand in its text (transformers' assistant mask stops at the first
    uncovered character instead).

    Asked of the Rust encoding where both ends are covered (char_to_token returns the first token holding a
    character; the byte-fallback pieces of the last character follow it); from all the offsets otherwise."""
    n = len(encoding)  # not len(encoding.ids), which builds the list of ids
    mask = np.zeros(n, dtype=np.uint8)
    if b <= a:
        return mask
    first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
    if first is None or last is None:
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        starts = np.minimum(starts, np.concatenate([[0], ends[:-1]]))
        hit = np.nonzero(trained_mask(starts, ends, [(a, b)]))[0]
        if len(hit):
            mask[hit[0] : hit[-1] + 1] = 1
        return mask
    while last + 1 < n and encoding.token_to_chars(last + 1)[0] < b:
        last += 1
    mask[first : last + 1] = 1
    return mask


class _Encoder:
    """Texts -> Rust encodings, without special tokens added, as apply_chat_template tokenizes its rendering."""

    def __init__(self, tok):
        if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
            raise ConfigError("conversations need a fast tokenizer (a tokenizer.json): the labels come from "
                              "character offsets", hint="save the tokenizer with a recent transformers")
        self.tok = tok

    def __call__(self, texts: list[str]) -> list:
        from alpaca_cli.core.tokenize import encode_batch

        return encode_batch(self.tok, texts, add_special_tokens=False)


def tokenize_conversations(
    tok,
    template_text: str,
    conversations: Sequence[Sequence[Mapping]],
    *,
    max_length: int,
    on_overflow: str = "truncate",
    train_on: str = "all",
    source_offset: int = 0,
    into=None,
    progress: Callable[[int], None] | None = None,
    stats: ChatStats | None = None,
    batch_size: int = 512,
):
    """Tokenize conversations (lists of messages, as `to_messages` gives them) with their assistant-only targets.

    Each conversation gives one example, or one per trained turn where the template is not prefix-preserving (see
    the module docstring). on_overflow: "truncate" keeps the first max_length tokens, "drop" leaves the example out
    (dropped["too_long"]), "error" raises DataError naming the record. An example left with no trained token (every
    assistant token beyond the limit) is dropped as "no_trained_tokens". `stats` (when given) receives the totals.
    Returns a core.tokenize.Tokenized (`into`, when given, extended); `prompt_lengths` holds each example's first
    trained token.
    """
    from alpaca_cli.core.tokenize import Tokenized, special_tokens_after_text

    if train_on not in TRAIN_ON:
        raise ConfigError(f"--train-on {train_on}: expected one of {', '.join(TRAIN_ON)}")
    if on_overflow not in ON_OVERFLOW:
        raise ConfigError(f"--on-overflow {on_overflow}: expected one of {', '.join(ON_OVERFLOW)}")
    out = into if into is not None else Tokenized()
    stats = stats if stats is not None else ChatStats()
    render, encoder = Renderer(tok, template_text), _Encoder(tok)
    stanford = template_text.startswith(ALPACA_MARK) and not special_tokens_after_text(tok)
    bos = _bos_text(tok) if stanford else ""
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        plans: list[Any] = []
        for j, messages in enumerate(batch):
            _count_messages(stats, messages)
            single = stanford and [m["role"] for m in messages] == ["user", "assistant"]
            plan = _stanford_plan(tok, render, messages, bos) if single else None
            plans.append(plan or conversation_pieces(render, messages, train_on=train_on,
                                                     where=f"record {source_offset + start + j}"))
        encoded = iter(encoder([p.text for plan in plans if isinstance(plan, list) for p in plan]))
        stanford_examples = iter(_stanford_examples(tok, [p for p in plans if isinstance(p, tuple)]))
        for j, plan in enumerate(plans):
            src = source_offset + start + j
            if isinstance(plan, tuple):
                stats.stanford_rule += 1
                ids, targets = next(stanford_examples)
                _add_example(out, stats, ids, [targets], src, max_length=max_length, on_overflow=on_overflow)
                continue
            stats.split_conversations += int(plan[0].split)
            for piece in plan:
                encoding = next(encoded)
                masks = [turn_mask(encoding, a, b) for a, b in piece.spans]
                _add_example(out, stats, encoding.ids, masks, src, max_length=max_length, on_overflow=on_overflow)
        if progress is not None:
            progress(len(batch))
    return out


def _count_messages(stats: ChatStats, messages: Sequence[Mapping]) -> None:
    stats.conversations += 1
    stats.messages += len(messages)
    for role, n in Counter(m["role"] for m in messages).items():
        stats.roles[role] = stats.roles.get(role, 0) + n
    stats.assistant_turns += sum(m["role"] == "assistant" for m in messages)


def _add_example(out, stats: ChatStats, ids, turn_masks: list[np.ndarray], src: int, *, max_length: int,
                 on_overflow: str) -> None:
    """One example into `out`, its targets the union of its trained turns' masks (never position 0, which nothing
    predicts): truncated, dropped or refused when too long; dropped when no token is left to train. Counts the
    turns cut by the limit and the turns lost beyond it."""
    n = len(ids)
    if n > max_length:
        if on_overflow == "error":
            raise DataError(f"record {src} is {n} tokens long, over --max-length {max_length}",
                            hint="raise --max-length, or use --on-overflow truncate or drop")
        if on_overflow == "drop":
            out.dropped["too_long"] += 1
            out.dropped_examples.append((src, "too_long"))
            return
    turn_masks = [m for m in turn_masks if m[1:].any()]  # a turn that trains nothing is no trained turn
    targets = np.zeros(n, dtype=np.uint8)
    for m in turn_masks:
        targets |= m
    targets[:1] = 0
    kept_turns = len(turn_masks)
    if n > max_length:
        out.truncated += 1
        out.truncated_tokens += n - max_length
        kept = [int(m[1:max_length].sum()) for m in turn_masks]
        stats.cut_in_turn += sum(0 < k < int(m[1:].sum()) for k, m in zip(kept, turn_masks))
        stats.turns_beyond_limit += sum(k == 0 for k in kept)
        kept_turns = sum(k > 0 for k in kept)
        ids, targets = ids[:max_length], targets[:max_length]
    if not targets.any():
        out.dropped["no_trained_tokens"] += 1
        out.dropped_examples.append((src, "no_trained_tokens"))
        return
    out.input_ids.append(np.asarray(ids, dtype=np.int32))
    out.targets.append(targets)
    out.source_index.append(src)
    out.prompt_lengths.append(int(np.argmax(targets)))
    stats.examples += 1
    stats.tokens += len(targets)
    stats.trained_tokens += int(targets.sum())
    stats.trained_turns += kept_turns


# -- the alpaca template: Stanford's rule ---------------------------------------------------------------------------


def _bos_text(tok) -> str:
    """The BOS token's text when the tokenizer puts one in front of text (as tokenizing an Alpaca record does)."""
    from alpaca_cli.core.prompts import adds_bos

    return tok.bos_token if adds_bos(tok) else ""


def _stanford_plan(tok, render: Renderer, messages: Sequence[Mapping], bos: str) -> tuple[str, str] | None:
    """(prompt, output) of a [user, assistant] conversation under the `alpaca` template, when its rendering is
    exactly what tokenize_examples tokenizes (BOS text + prompt + output + eos); None otherwise (the generic rule)."""
    try:
        p = render(messages[:1], add_generation_prompt=True)
        r = render(messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - the generic path renders it again and names the record
        return None
    output = messages[1]["content"]
    if tok.eos_token is None or not (p.startswith(bos) and r == p + output + tok.eos_token):
        return None
    return p[len(bos):], output


def _stanford_examples(tok, plans: list[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, targets) of each (prompt, output) by tokenize_examples, untruncated: keeping the first max_length of
    both is what Stanford's truncation gives (the caller truncates, counts and drops as for any example)."""
    from alpaca_cli.core.tokenize import tokenize_examples

    if not plans:
        return []
    result = tokenize_examples(tok, [p for p, _ in plans], [o for _, o in plans], max_length=2**62)
    if len(result.input_ids) != len(plans):  # an untruncated Alpaca example always trains its EOS
        raise AssertionError("tokenize_examples dropped an untruncated example")
    return list(zip(result.input_ids, result.targets))
