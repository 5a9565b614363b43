"""Chat templates of real instruct models, tokenizers that carry them, and an independent oracle for the labels.

The oracle is transformers' own `return_assistant_tokens_mask`: each template in tests/assets/chat_templates/ has a
hand-written `*.generation.jinja` twin whose `{% generation %}...{% endgeneration %}` markers wrap what an assistant
turn should be trained on (its content and what closes the turn, not the header before it nor the whitespace after
the closing token) and which renders byte-identically to the original. The mask transformers derives from those markers
(through the tokenizer's character offsets) shares no code with `alpaca_cli.core.chat`, which finds the same spans
by rendering prefixes of the conversation.

Tokenizers are built offline from tests/assets/tok400 (a 400-token SentencePiece-style BPE with byte fallback): each
template's control tokens are added to it as single added tokens, and bos/eos set as the model has them.
"""

from __future__ import annotations

import dataclasses
import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES_DIR = os.path.join(HERE, "assets", "chat_templates")
TOK400 = os.path.join(HERE, "assets", "tok400", "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """One model's chat template and the tokens its tokenizer carries for it."""

    name: str
    file: str  # in TEMPLATES_DIR; the generation twin is <stem>.generation.jinja
    bos: str | None
    eos: str
    special: tuple[str, ...]  # added special tokens (bos/eos included)
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <tool_call>, <think> ...)
    rstrip: bool = False  # added tokens swallow whitespace to their right (Phi-3's chat tokens)
    tools: bool = False  # the template renders tool calls and tool messages
    alternating: bool = False  # the template refuses anything but user/assistant alternation
    system: bool = True  # the template accepts a system message

    @property
    def path(self) -> str:
        return os.path.join(TEMPLATES_DIR, self.file)

    @property
    def generation_path(self) -> str:
        return os.path.join(TEMPLATES_DIR, self.file.replace(".jinja", ".generation.jinja"))

    @property
    def text(self) -> str:
        with open(self.path, encoding="utf-8", newline="") as f:
            return f.read()

    @property
    def generation_text(self) -> str:
        with open(self.generation_path, encoding="utf-8", newline="") as f:
            return f.read()


_QWEN_PLAIN = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
SPECS = {
    s.name: s
    for s in (
        TemplateSpec(
            "llama-3.1",
            "llama-3.1-8b-instruct.jinja",
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            special=("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eom_id|>", "<|python_tag|>", "<|end_of_text|>"),
            tools=True,
        ),
        TemplateSpec(
            "qwen2.5",
            "qwen2.5-7b-instruct.jinja",
            bos=None,
            eos="<|im_end|>",
            special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            plain_added=_QWEN_PLAIN,
            tools=True,
        ),
        TemplateSpec(
            "gemma-2",
            "gemma-2-2b-it.jinja",
            bos="<bos>",
            eos="<eos>",
            special=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
            alternating=True,
            system=False,
        ),
        TemplateSpec(
            "mistral-v0.3",
            "mistral-7b-instruct-v0.3.jinja",
            bos="<s>",
            eos="</s>",
            special=("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                     "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
            tools=True,
            alternating=True,
        ),
        TemplateSpec(
            "phi-3",
            "phi-3-mini-4k-instruct.jinja",
            bos="<s>",
            eos="<|endoftext|>",
            special=("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            rstrip=True,
        ),
        TemplateSpec(
            "qwen3",
            "qwen3-0.6b.jinja",
            bos=None,
            eos="<|im_end|>",
            special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            plain_added=_QWEN_PLAIN + ("<think>", "</think>"),
            tools=True,
        ),
    )
}


BASES = ("tok400", "bytelevel")


def _base_backend(base: str):
    """tok400 (SentencePiece-style: Metaspace, byte fallback, as Llama 2 / Mistral / Gemma / Phi-3 tokenize) or a
    byte-level BPE trained here on the test conversations (GPT-2 style, as Llama 3 / Qwen tokenize)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    if base == "tok400":
        return Tokenizer.from_file(TOK400)
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>"], show_progress=False)
    texts = [m["content"] for conv in list(CONVERSATIONS.values()) + list(THINKING.values()) for m in conv]
    backend.train_from_iterator(texts + ["Hello world, how are you? The quick brown fox."] * 3, trainer)
    return backend


@functools.cache
def chat_tokenizer(name: str, base: str = "tok400"):
    """A fast tokenizer built offline (from `base`, see _base_backend) carrying template `name` and its tokens.

    Each control token of the template is ONE token (an added special token; Qwen's <think>/<tool_call> are added
    non-special tokens, as in Qwen's own tokenizer). bos/eos are the model's. Cached: do not mutate the result.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    backend = _base_backend(base)
    backend.add_special_tokens(
        [AddedToken(t, rstrip=spec.rstrip, normalized=False, special=True) for t in spec.special]
    )
    if spec.plain_added:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in spec.plain_added])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token="<unk>",
        pad_token=spec.eos,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = spec.text
    for t in spec.special + spec.plain_added:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, (name, t)
    return tok


def render(tok, template: str, messages, *, add_generation_prompt: bool = False, **kw) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kw)


def oracle_mask(tok, generation_template: str, messages, **kw) -> tuple[list[int], list[int]]:
    """(input_ids, mask) from transformers' `return_assistant_tokens_mask` on a `{% generation %}` template."""
    out = tok.apply_chat_template(messages, chat_template=generation_template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **kw)
    return list(out["input_ids"]), list(out["assistant_masks"])


def runs(mask) -> list[tuple[int, int]]:
    """The [start, end) runs of 1s in a 0/1 mask."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def oracle_last_turn(tok, generation_template: str, messages, **kw) -> tuple[list[int], list[int]]:
    """The oracle for a per-turn example: messages rendered alone, only its last assistant turn trained.

    Keeps the last run of 1s of the oracle's mask; checks that the runs are one per assistant message (the turns'
    spans never touch, so the last run is the last turn's).
    """
    ids, mask = oracle_mask(tok, generation_template, messages, **kw)
    spans = runs(mask)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert len(spans) == n_assistant, (spans, n_assistant)
    last = [0] * len(mask)
    if spans:
        s, e = spans[-1]
        last[s:e] = [1] * (e - s)
    return ids, last


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _s(text):
    return {"role": "system", "content": text}


LONG = " ".join(f"word{i % 97} 数{i % 13}" for i in range(1500))  # a very long turn (~12k characters)

CONVERSATIONS: dict[str, list[dict]] = {
    "single": [_u("What is 2+2?"), _a("4.")],
    "multi": [_u("Hi there."), _a("Hello! How can I help?"), _u("Name three colours."), _a("Red, green and blue.")],
    "system_multi": [_s("You are terse."), _u("Hi."), _a("Hi."), _u("Capital of France?"), _a("Paris.")],
    "unicode": [
        _u("翻译：你好，世界 🌍"),
        _a("Hello, world 🌍 — 你好！"),
        _u("e\u0301 vs \u00e9, n\u0303, 👩\u200d👩\u200d👧 family, ZWJ."),
        _a("Combining marks: a\u0308o\u0308u\u0308; emoji: 🤖🎉; 日本語テキスト。"),
    ],
    "empty_assistant": [_u("Say nothing."), _a(""), _u("Now say yes."), _a("yes")],
    "empty_user": [_u(""), _a("You sent an empty message."), _u("ok"), _a("ok")],
    "whitespace": [_u("  padded question \n"), _a("\n  padded answer  \n\n"), _u("x"), _a("line1\n\nline2\n")],
    "long": [_u("Summarise this: " + LONG), _a("A long text. " + LONG[:4000]), _u("Thanks."), _a("You're welcome.")],
    "special_text": [_u("What does <|im_end|> or [INST] mean?"), _a("They are control tokens: </s> <eos>.")],
}

# Qwen3: reasoning in an earlier turn (dropped by the template once a later user turn exists) and in the last one.
THINKING: dict[str, list[dict]] = {
    "think_multi": [
        _u("2+2?"),
        _a("<think>\nAdd two and two.\n</think>\n\n4."),
        _u("And 3+3?"),
        _a("<think>\nThree plus three.\n</think>\n\n6."),
    ],
    "reasoning_field": [
        _u("Why is the sky blue?"),
        {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "Short light scatters more."},
        _u("Thanks"),
        {"role": "assistant", "content": "Welcome.", "reasoning_content": "Be polite."},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOL_CONVERSATION = [
    _u("Weather in Paris?"),
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call12345", "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "tool_call_id": "call12345", "content": "18C, sunny"},
    _a("It is 18C and sunny in Paris."),
]


def conversations_for(name: str) -> dict[str, list[dict]]:
    """The conversations template `name` renders (those with a system message only where it takes one)."""
    spec = SPECS[name]
    out = {k: v for k, v in CONVERSATIONS.items() if spec.system or all(m["role"] != "system" for m in v)}
    if name == "qwen3":
        out.update(THINKING)
    return out
