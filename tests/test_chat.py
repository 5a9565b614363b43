"""Conversations (core/chat.py): formats, templates, and the assistant-only labels, each against an independent
computation: the chat texts are written here by hand (not rendered by our Jinja), the trained spans found by regex
over them and mapped to tokens by the tokenizer's own offsets; Alpaca's labels come from Stanford's recipe."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import DEMO_TOKENIZER, read_records, stanford_examples
from stanford_reference import PROMPT_DICT, stanford_tokenizer

from alpaca_cli.core import chat
from alpaca_cli.core.tokenize import tokenize_examples
from alpaca_cli.errors import ConfigError, DataError

TOK400 = "tests/assets/tok400"


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER)


@pytest.fixture(scope="module")
def chatml_tok():
    """The demo tokenizer with ChatML's two tokens added as special tokens (what an instruct model's has)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": list(chat.CHATML_TOKENS)})
    return tok


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# -- formats --------------------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris? ☀"},
    {"role": "assistant", "content": "get_weather(city='Paris')"},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 °C."},
]
SHAREGPT = [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Weather in Paris? ☀"},
    {"from": "function_call", "value": "get_weather(city='Paris')"},
    {"from": "observation", "value": "{\"temp\": 21}"},
    {"from": "gpt", "value": "21 °C."},
]


def test_tool_calls_and_reasoning_reach_the_template():
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": None, "tool_calls": call, "weight": 0},
                        {"role": "tool", "content": "21", "tool_call_id": "c1", "name": "get_weather"},
                        {"role": "assistant", "content": "21 °C.", "reasoning_content": "It said 21."}]}
    assert chat.to_messages(row, "messages", where="r") == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "21", "tool_call_id": "c1", "name": "get_weather"},
        {"role": "assistant", "content": "21 °C.", "reasoning_content": "It said 21."}]


def test_detect_format():
    assert chat.detect_format({"messages": MESSAGES}) == "messages"
    assert chat.detect_format({"conversations": SHAREGPT, "id": 3}) == "sharegpt"
    assert chat.detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert chat.detect_format({"messages": SHAREGPT}) == "sharegpt"  # ShareGPT turns under `messages`
    assert chat.to_messages({"messages": SHAREGPT}, "sharegpt", where="r") == chat.to_messages(
        {"messages": MESSAGES}, "messages", where="r")
    with pytest.raises(DataError) as e:
        chat.detect_format({"text": "x"}, where="data.jsonl line 7")
    assert "data.jsonl line 7" in _one_line(e) and "text" in str(e.value)


def test_sharegpt_and_messages_normalise_to_the_same_messages():
    a = chat.to_messages({"messages": MESSAGES}, "messages", where="r")
    b = chat.to_messages({"conversations": SHAREGPT}, "sharegpt", where="r")
    assert a == b == [{"role": m["role"], "content": m["content"]} for m in MESSAGES]
    # LLaMA-Factory's form: the system prompt beside the turns
    c = chat.to_messages({"system": "You are terse.", "conversations": SHAREGPT[1:]}, "sharegpt", where="r")
    assert c == a
    assert chat.to_messages({"chat": MESSAGES}, "messages", where="r", field="chat") == a
    # ShareGPT lists written with role/content (many Hub datasets)
    d = [{"role": m["role"], "content": m["content"]} for m in MESSAGES]
    assert chat.to_messages({"conversations": d}, "sharegpt", where="r") == a
    with pytest.raises(DataError) as e:
        chat.to_messages({"messages": MESSAGES}, "messages", where="r", field="chat")
    assert "`chat` must be a list of turns, found null" in _one_line(e)


@pytest.mark.parametrize("fmt,row,words", [
    ("messages", {"messages": "hi"}, ["`messages`", "a string"]),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, ["no assistant turn"]),
    ("messages", {"messages": [{"role": "robot", "content": "hi"}]}, ["robot", "known: system, user"]),
    ("messages", {"messages": [{"role": "assistant", "content": None}]}, ["messages[0].content", "null"]),
    ("messages", {"messages": [{"role": "assistant", "content": [{"type": "text"}]}]}, ["a list"]),
    ("messages", {"messages": ["hi"]}, ["messages[0]", "an object"]),
    ("messages", {"messages": [{"role": ["user"], "content": "x"}]}, ["messages[0].role", "['user']"]),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, ["bot", "known: system, human"]),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": 3}]}, ["conversations[0].value", "a number"]),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, ["no assistant turn"]),
    ("sharegpt", ["not", "an object"], ["JSON object"]),
])
def test_bad_records_are_refused_in_one_line_naming_the_record(fmt, row, words):
    with pytest.raises(DataError) as e:
        chat.to_messages(row, fmt, where="chat.jsonl line 12")
    text = _one_line(e)
    assert text.startswith("chat.jsonl line 12: "), text
    for w in words:
        assert w in text, (w, text)


# -- templates ------------------------------------------------------------------------------------------------------


def test_base_tokenizer_without_template_is_refused_naming_the_choices(demo):
    assert not demo.chat_template
    with pytest.raises(ConfigError) as e:
        chat.resolve_template(demo, None)
    assert "--chat-template FILE|chatml|alpaca" in _one_line(e)


def test_resolve_template_builtins_files_and_the_tokenizers_own(demo, chatml_tok, tmp_path):
    assert chat.resolve_template(demo, "chatml") == chat.ChatTemplate("chatml", chat.CHATML, chat.CHATML_TOKENS)
    assert chat.resolve_template(chatml_tok, "chatml").missing_tokens == ()
    assert chat.resolve_template(demo, "alpaca").text == chat.BUILTIN_TEMPLATES["alpaca"]  # Llama adds a BOS
    path = tmp_path / "t.jinja"
    path.write_text(chat.CHATML)
    assert chat.resolve_template(demo, str(path)) == chat.ChatTemplate(str(path), chat.CHATML)
    with pytest.raises(ConfigError) as e:
        chat.resolve_template(demo, str(tmp_path / "missing.jinja"))
    assert "no such file" in _one_line(e)
    path.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError) as e:
        chat.resolve_template(demo, str(path))
    assert "not a valid Jinja template" in _one_line(e)

    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    own.chat_template = chat.CHATML
    assert chat.resolve_template(own, None) == chat.ChatTemplate("tokenizer", chat.CHATML)


def test_renderer_is_apply_chat_template(chatml_tok):
    for template in (chat.CHATML, chat.BUILTIN_TEMPLATES["alpaca"], MISTRAL_LIKE):
        render = chat.Renderer(chatml_tok, template)
        conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}] if template != chat.BUILTIN_TEMPLATES["alpaca"] else \
            [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
        for k in range(1, len(conv) + 1):
            for gen in (False, True):
                assert render(conv[:k], add_generation_prompt=gen) == chatml_tok.apply_chat_template(
                    conv[:k], chat_template=template, tokenize=False, add_generation_prompt=gen)


# -- the alpaca built-in: Stanford's prompt and labels --------------------------------------------------------------


STRADDLE = {"instruction": "Quote yes.", "input": "", "output": "\"yes\" it is."}
"""Its prompt ends in ':' and its output starts with '"': one token ':"' for a byte-level BPE that learnt it."""


def _alpaca_records(path="tests/assets/alpaca_awkward.jsonl"):
    return read_records(path) + [STRADDLE]


def _conversation(record) -> list[dict]:
    """An Alpaca record as a conversation (the input, when there is one, on the user message, as the alpaca
    template's `input` key)."""
    user = {"role": "user", "content": record["instruction"]}
    if record.get("input", ""):
        user["input"] = record["input"]
    return [user, {"role": "assistant", "content": record["output"]}]


def test_alpaca_builtin_renders_stanfords_prompt_output_and_eos(demo):
    template = chat.resolve_template(demo, "alpaca").text
    for r in _alpaca_records():
        key = "prompt_input" if r.get("input", "") != "" else "prompt_no_input"
        expected = demo.bos_token + PROMPT_DICT[key].format_map({"input": "", **r}) + r["output"] + demo.eos_token
        assert demo.apply_chat_template(_conversation(r), chat_template=template, tokenize=False) == expected
        prompt = demo.apply_chat_template(_conversation(r)[:1], chat_template=template, tokenize=False,
                                          add_generation_prompt=True)
        assert prompt == demo.bos_token + PROMPT_DICT[key].format_map({"input": "", **r})


def _byte_level_tokenizer(tmp_path):
    """A Llama-3-like byte-level BPE (<|begin_of_text|> added in front), trained on the awkward records: its
    merges put ':' and '"' in one token (`### Response:"yes"` is in its training text), across the Alpaca
    prompt/response boundary of STRADDLE."""
    from test_tokenizers import KINDS, _train_bpe
    from transformers import PreTrainedTokenizerFast

    spec = KINDS["llama3"]
    records = _alpaca_records()
    texts = [PROMPT_DICT["prompt_input"].format_map({"input": "", **r}) + r["output"] for r in records] * 5
    texts += ['### Response:"yes"'] * 20
    backend = _train_bpe(texts, byte_level=True, specials=spec["specials"], bos=spec["bos"])
    folder = str(tmp_path / "bytelevel")
    PreTrainedTokenizerFast(tokenizer_object=backend, **spec["names"]).save_pretrained(folder)
    return folder


def _kind_tokenizer(kind, tmp_path):
    """test_tokenizers' Qwen-base-like (no BOS, pad == eos) and Gemma-like tokenizers."""
    from test_tokenizers import KINDS, _train_bpe
    from transformers import PreTrainedTokenizerFast

    spec = KINDS[kind]
    texts = [PROMPT_DICT["prompt_input"].format_map({"input": "", **r}) + r["output"] for r in _alpaca_records()]
    backend = _train_bpe(texts * 5, byte_level=spec["byte_level"], specials=spec["specials"], bos=spec["bos"])
    folder = str(tmp_path / kind)
    PreTrainedTokenizerFast(tokenizer_object=backend, **spec["names"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("which", ["demo", "tok400", "bytelevel", "pad-is-eos", "gemma"])
@pytest.mark.parametrize("max_length", [512, 48])
def test_alpaca_single_turn_gives_exactly_the_alpaca_records_labels(which, max_length, tmp_path):
    from alpaca_cli.core.tokenize import load_tokenizer

    folder = {"demo": DEMO_TOKENIZER, "tok400": TOK400}.get(which)
    if folder is None:
        folder = _byte_level_tokenizer(tmp_path) if which == "bytelevel" else _kind_tokenizer(which, tmp_path)
    tok = load_tokenizer(folder).tokenizer  # with Stanford's added special tokens, as prepare loads it
    records = _alpaca_records()
    template = chat.resolve_template(tok, "alpaca").text
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(tok, template, [_conversation(r) for r in records], max_length=max_length,
                                      stats=stats)
    prompts = [PROMPT_DICT["prompt_input" if r.get("input", "") else "prompt_no_input"].format_map(
        {"input": "", **r}) for r in records]
    want = tokenize_examples(tok, prompts, [r["output"] for r in records], max_length=max_length)
    assert got.source_index == want.source_index
    for a, b, c, d in zip(got.input_ids, want.input_ids, got.targets, want.targets):
        assert a.tolist() == b.tolist() and c.tolist() == d.tolist()
    assert (got.truncated, got.dropped) == (want.truncated, want.dropped)
    assert stats.stanford_rule == len(records)
    # and Stanford's own recipe (each text tokenized alone, the prompt's length masked)
    stanford = stanford_examples(records, stanford_tokenizer(folder, use_fast=True), max_length=max_length)
    mine = {s: (ids.tolist(), np.where(t == 1, ids, -100).tolist())
            for s, ids, t in zip(got.source_index, got.input_ids, got.targets)}
    assert mine == stanford


def test_generic_rule_would_train_the_straddling_token_so_alpaca_takes_stanfords(tmp_path):
    """Why single-turn `alpaca` goes through tokenize_examples: on a byte-level tokenizer ':"' is one token across
    the prompt/response boundary; the generic rule (intersecting spans) trains it, Stanford's rule does not."""
    from alpaca_cli.core.tokenize import load_tokenizer

    tok = load_tokenizer(_byte_level_tokenizer(tmp_path)).tokenizer
    record = STRADDLE
    template = chat.resolve_template(tok, "alpaca").text
    stanford = chat.tokenize_conversations(tok, template, [_conversation(record)], max_length=512)
    generic = chat.tokenize_conversations(tok, template[len(chat.ALPACA_MARK):], [_conversation(record)],
                                          max_length=512)
    assert stanford.input_ids[0].tolist() == generic.input_ids[0].tolist()
    diff = np.nonzero(stanford.targets[0] != generic.targets[0])[0].tolist()
    assert len(diff) == 1 and generic.targets[0][diff[0]] == 1
    assert tok.convert_ids_to_tokens(int(stanford.input_ids[0][diff[0]])) == ':"'


# -- chatml: trained tokens against a hand-computed reference -------------------------------------------------------


def _chatml_text(messages) -> str:
    """ChatML written by hand (not by our Jinja)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _reference_targets(tok, text: str, pattern: str, *, last_only: bool = False) -> tuple[list[int], list[int]]:
    """(ids, targets): a token is trained iff its offsets intersect a regex match's group 1 (the assistant's
    content and closing token)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span(1) for m in re.finditer(pattern, text, flags=re.S)]
    if last_only:
        spans = spans[-1:]
    targets = [int(e > s and any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    targets[0] = 0
    return enc["input_ids"], targets


CHATML_ASSISTANT = r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"

CONVERSATIONS = {
    "with-system": [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語 please 😀"},
        {"role": "assistant", "content": "緑 (green) — “quoted”"},
    ],
    "without-system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?  "},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": " ".join(str(i) for i in range(60))},
    ],
}


def _check_chatml(tok, conv, **kw) -> None:
    got = chat.tokenize_conversations(tok, chat.CHATML, [conv], max_length=4096, **kw)
    ids, targets = _reference_targets(tok, _chatml_text(conv), CHATML_ASSISTANT,
                                      last_only=kw.get("train_on") == "last")
    assert got.input_ids[0].tolist() == ids
    assert got.targets[0].tolist() == targets


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tokens", ["special", "plain-text"])
def test_chatml_trains_each_assistant_turn_and_its_closing_token(name, tokens, demo, chatml_tok):
    tok = chatml_tok if tokens == "special" else demo
    conv = CONVERSATIONS[name]
    assert chat.Renderer(tok, chat.CHATML)(conv) == _chatml_text(conv)
    _check_chatml(tok, conv)
    _check_chatml(tok, conv, train_on="last")
    if tokens == "special":  # the trained text is each turn's content and its <|im_end|>, nothing else
        got = chat.tokenize_conversations(tok, chat.CHATML, [conv], max_length=4096)
        trained = tok.decode([i for i, t in zip(got.input_ids[0], got.targets[0]) if t])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")


@pytest.mark.parametrize("mutation", ["header", "no-closing", "whitespace-after"])
def test_chatml_check_fails_under_a_mutation(mutation, chatml_tok, monkeypatch):
    """The comparison above catches a rule that trains the role header, leaves the closing token out, or trains
    the newline after it."""
    header, close = len("<|im_start|>assistant\n"), len("<|im_end|>")
    shift = {"header": (-header, 0), "no-closing": (0, -close), "whitespace-after": (0, 1)}[mutation]
    real = chat.turn_mask

    def mutated(encoding, a, b):
        return real(encoding, a + shift[0], b + shift[1])

    monkeypatch.setattr(chat, "turn_mask", mutated)
    with pytest.raises(AssertionError):
        _check_chatml(chatml_tok, CONVERSATIONS["with-system"])


def test_stats_count_turns_roles_and_trained_tokens(chatml_tok):
    stats = chat.ChatStats()
    convs = [CONVERSATIONS["with-system"], CONVERSATIONS["without-system"]]
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, convs, max_length=4096, stats=stats)
    assert stats.conversations == 2 and stats.examples == 2
    assert stats.messages == 11
    assert stats.roles == {"system": 1, "user": 5, "assistant": 5}
    assert stats.assistant_turns == 5 and stats.trained_turns == 5  # the empty turn still trains its <|im_end|>
    assert stats.trained_tokens == sum(int(t.sum()) for t in got.targets)
    assert stats.tokens == sum(len(i) for i in got.input_ids)
    total = chat.ChatStats().merge(stats).merge(stats)
    assert total.roles["user"] == 10 and total.trained_tokens == 2 * stats.trained_tokens


# -- a template that rewrites earlier turns -------------------------------------------------------------------------

MISTRAL_LIKE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if system is defined and loop.index0 == ns.last_user -%}"
    "{{ '[INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{%- else -%}{{ '[INST] ' + m['content'] + ' [/INST]' }}{%- endif -%}"
    "{%- else -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
"""Mistral's way with a system prompt: it goes into the LAST user turn, so each new turn rewrites earlier ones."""


def _mistral_text(messages, upto_user: int) -> str:
    """By hand: the system prompt in the user turn numbered `upto_user` (0-based among user turns)."""
    system = messages[0]["content"]
    out, u = "<s>", 0
    for m in messages[1:]:
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if u == upto_user else m["content"]
            out += f"[INST] {content} [/INST]"
            u += 1
        else:
            out += f" {m['content']}</s>"
    return out


MISTRAL_ASSISTANT = r"\[/INST\]( [^<]*</s>)$"
CONV3 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
         {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
         {"role": "assistant", "content": "2"}, {"role": "user", "content": "Three?"},
         {"role": "assistant", "content": "3, done."}]


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_non_prefix_preserving_template_gives_one_example_per_assistant_turn(train_on, demo):
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(demo, MISTRAL_LIKE, [CONV3], max_length=4096, train_on=train_on, stats=stats,
                                      source_offset=40)
    turns = [2, 4, 6] if train_on == "all" else [6]
    # with train_on=last the one trained turn is the whole rendering's end: nothing rewritten, nothing to split
    assert stats.split_conversations == (train_on == "all") and stats.conversations == 1
    assert stats.examples == len(turns) and got.source_index == [40] * len(turns)
    for k, i in enumerate(turns):
        # turn i in the context the template gives it at that turn: the system prompt in the then-last user turn
        text = _mistral_text(CONV3[: i + 1], upto_user=i // 2 - 1)
        ids, targets = _reference_targets(demo, text, MISTRAL_ASSISTANT)
        assert got.input_ids[k].tolist() == ids
        assert got.targets[k].tolist() == targets
        assert demo.decode([t for t, m in zip(ids, targets) if m]) == " " + CONV3[i]["content"] + "</s>"


def test_prefix_preserving_conversation_under_the_same_template_is_one_example(demo):
    conv = [m for m in CONV3 if m["role"] != "system"]  # without a system prompt nothing moves
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(demo, MISTRAL_LIKE, [conv], max_length=4096, stats=stats)
    assert stats.split_conversations == 0 and len(got.input_ids) == 1
    text = "<s>" + "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else f" {m['content']}</s>"
                           for m in conv)
    ids, targets = _reference_targets(demo, text, r"\[/INST\]( [^<]*</s>)")
    assert got.input_ids[0].tolist() == ids and got.targets[0].tolist() == targets


# -- train_on, truncation, drops, errors ----------------------------------------------------------------------------


def test_truncation_inside_a_turn_is_counted_and_keeps_the_first_tokens(chatml_tok):
    conv = CONVERSATIONS["with-system"]
    ids, targets = _reference_targets(chatml_tok, _chatml_text(conv), CHATML_ASSISTANT)
    second = [k for k, t in enumerate(targets) if t][-1]  # the last trained token: <|im_end|> of turn 2
    cut = second - 2  # inside the second assistant turn
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv], max_length=cut, stats=stats)
    assert got.input_ids[0].tolist() == ids[:cut] and got.targets[0].tolist() == targets[:cut]
    assert got.truncated == 1 and got.truncated_tokens == len(ids) - cut
    assert stats.cut_in_turn == 1 and stats.turns_beyond_limit == 0 and stats.trained_turns == 2


def test_every_assistant_token_beyond_the_limit_drops_the_conversation(chatml_tok):
    conv = CONVERSATIONS["with-system"]
    ids, targets = _reference_targets(chatml_tok, _chatml_text(conv), CHATML_ASSISTANT)
    first = targets.index(1)
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv, conv], max_length=first, stats=stats,
                                      source_offset=7)
    assert got.input_ids == [] and got.dropped["no_trained_tokens"] == 2
    assert got.dropped_examples == [(7, "no_trained_tokens"), (8, "no_trained_tokens")]
    assert stats.turns_beyond_limit == 4 and stats.examples == 0
    # one token more and the first token of turn 1 is kept
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv], max_length=first + 1)
    assert got.targets[0].tolist() == targets[: first + 1]


def test_train_on_last_with_the_last_turn_beyond_the_limit_is_dropped(chatml_tok):
    conv = CONVERSATIONS["with-system"]
    ids, targets = _reference_targets(chatml_tok, _chatml_text(conv), CHATML_ASSISTANT, last_only=True)
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv], max_length=targets.index(1), train_on="last")
    assert got.dropped["no_trained_tokens"] == 1 and got.input_ids == []


def test_on_overflow_drop_and_error(chatml_tok):
    conv = CONVERSATIONS["with-system"]
    n = len(chatml_tok(_chatml_text(conv), add_special_tokens=False)["input_ids"])
    got = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv], max_length=n - 1, on_overflow="drop")
    assert got.dropped["too_long"] == 1 and got.dropped_examples == [(0, "too_long")]
    ok = chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv], max_length=n, on_overflow="error")
    assert len(ok.input_ids[0]) == n and ok.truncated == 0
    with pytest.raises(DataError) as e:
        chat.tokenize_conversations(chatml_tok, chat.CHATML, [conv, conv], max_length=n - 1, on_overflow="error",
                                    source_offset=3)
    assert _one_line(e).startswith(f"record 3 is {n} tokens long, over --max-length {n - 1}")


def test_a_template_that_refuses_a_conversation_names_the_record(demo):
    template = chat.resolve_template(demo, "alpaca").text  # user and assistant messages only
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(DataError) as e:
        chat.tokenize_conversations(demo, template, [conv], max_length=64, source_offset=5)
    assert _one_line(e).startswith("record 5: the chat template cannot render this conversation")
    assert "not system" in str(e.value)


def test_a_generation_prompt_that_is_not_the_turns_start_is_refused(demo):
    odd = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(DataError) as e:
        chat.tokenize_conversations(demo, odd, [CONVERSATIONS["with-system"]], max_length=512)
    assert _one_line(e).startswith("record 0: the chat template renders assistant message 2 differently")


CHATML = chat.CHATML


# -- against transformers' assistant mask, and offsets that a post-processor trims ----------------------------------

CHATML_GENERATION = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML with `{% generation %}` around each assistant turn's content and closing token: renders as CHATML does."""


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chatml_equals_transformers_assistant_mask(name, chatml_tok, tmp_path):
    from alpaca_cli.core.tokenize import load_tokenizer

    byte_level = load_tokenizer(_byte_level_tokenizer(tmp_path)).tokenizer
    for tok in (chatml_tok, byte_level):
        conv = CONVERSATIONS[name]
        assert tok.apply_chat_template(conv, chat_template=CHATML_GENERATION, tokenize=False) == _chatml_text(conv)
        want = tok.apply_chat_template(conv, chat_template=CHATML_GENERATION, return_dict=True,
                                       return_assistant_tokens_mask=True)
        got = chat.tokenize_conversations(tok, chat.CHATML, [conv], max_length=4096)
        assert got.input_ids[0].tolist() == want["input_ids"]
        assert got.targets[0].tolist() == [0] + want["assistant_masks"][1:]


def test_offsets_trimmed_by_a_post_processor(tmp_path):
    """A GPT-2-style tokenizer whose ByteLevel post-processor trims spaces off the offsets: ' 1' keeps only '1',
    runs of spaces get empty spans, and the space Mistral-like templates put before an answer belongs to no token.
    The reference: the same tokens' untrimmed offsets, intersected with the answer's span."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    folder = _byte_level_tokenizer(tmp_path)
    untrimmed = PreTrainedTokenizerFast.from_pretrained(folder)
    backend = untrimmed.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                      eos_token="<|end_of_text|>")
    untrimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    conv = [{"role": "user", "content": "Spaces?"}, {"role": "assistant", "content": "a    b  c"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "   d"}]
    # Mistral-like: each answer starts with an uncovered space (its tokens found from all the offsets); ChatML:
    # from char_to_token at both ends, the empty spans inside the answer between them
    for template, pattern in ((MISTRAL_LIKE, r"\[/INST\]( [^<]*<\|end_of_text\|>)"),
                              (CHATML, CHATML_ASSISTANT.replace("<\\|im_end\\|>", "<\\|end_of_text\\|>"))):
        if template == CHATML:
            template = template.replace("<|im_end|>", "<|end_of_text|>")
        got = chat.tokenize_conversations(trimmed, template, [conv], max_length=4096)
        text = chat.Renderer(trimmed, template)(conv)
        ids, targets = _reference_targets(untrimmed, text, pattern)
        enc = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == ids and any(s == e for s, e in enc["offset_mapping"])  # some spans are empty
        assert got.input_ids[0].tolist() == ids
        assert got.targets[0].tolist() == targets, template


PLAIN = ("{%- for m in messages -%}{{ ('A: ' if m['role'] == 'assistant' else 'U: ') + m['content'] + '\\n' }}"
         "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}")
"""No closing token: an answer's last character ends its trained span."""


def test_an_answer_ending_in_byte_fallback_pieces_trains_them_all(demo):
    conv = [{"role": "user", "content": "Rocket?"}, {"role": "assistant", "content": "Here: 🚀"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "🚀🚀"}]
    text = chat.Renderer(demo, PLAIN)(conv)
    assert text == "U: Rocket?\nA: Here: 🚀\nU: Again\nA: 🚀🚀\n"
    ids, targets = _reference_targets(demo, text, r"A: (.*?)\n")
    assert demo.convert_ids_to_tokens(ids[-5:-1]) == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]  # one emoji, 4 bytes
    got = chat.tokenize_conversations(demo, PLAIN, [conv], max_length=4096)
    assert got.input_ids[0].tolist() == ids and got.targets[0].tolist() == targets


QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""Qwen3's way with reasoning: the <think> of an answer after the last user message is rendered, earlier ones are
dropped, so the whole rendering is not the concatenation of the turns as each was produced."""


def test_reasoning_dropped_from_earlier_turns_trains_each_turn_with_its_reasoning(chatml_tok):
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"}]
    first = "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>\n"
    whole = ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"  # r1 dropped
             "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n")
    assert chat.Renderer(chatml_tok, QWEN3_LIKE)(conv) == whole
    stats = chat.ChatStats()
    got = chat.tokenize_conversations(chatml_tok, QWEN3_LIKE, [conv], max_length=4096, stats=stats)
    assert stats.split_conversations == 1 and len(got.input_ids) == 2
    for k, text in enumerate((first, whole)):
        ids, want = _reference_targets(chatml_tok, text, CHATML_ASSISTANT, last_only=True)  # the turn's own
        assert got.input_ids[k].tolist() == ids and got.targets[k].tolist() == want
        trained = chatml_tok.decode([i for i, t in zip(ids, want) if t])
        assert trained == ("<think>\nr1\n</think>\n\na1<|im_end|>", "<think>\nr2\n</think>\n\na2<|im_end|>")[k]
    # train_on=last: the last turn is the whole rendering's end, as produced: one example
    got = chat.tokenize_conversations(chatml_tok, QWEN3_LIKE, [conv], max_length=4096, train_on="last")
    assert len(got.input_ids) == 1 and got.input_ids[0].tolist() == chatml_tok(whole, add_special_tokens=False)[
        "input_ids"]
