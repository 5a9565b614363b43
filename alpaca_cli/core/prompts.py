"""Alpaca prompt templates: loading, validation, and rendering exactly as Stanford Alpaca does."""

from __future__ import annotations

import string
from typing import Mapping

from alpaca_cli.config import PromptTemplates
from alpaca_cli.errors import ConfigError

ALLOWED_PLACEHOLDERS = ("instruction", "input")
PROMPTS_FILE = "alpaca_prompts.json"
"""Where an export keeps the run's templates, so `alpaca generate --from-export` formats prompts the same way."""


def placeholders(template: str) -> list[str]:
    """Field names used by a str.format template, in order (may raise ValueError on a malformed template)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is not None:
            names.append(field_name)
    return names


def validate(templates: PromptTemplates, source: str = "prompts") -> None:
    """Reject malformed templates and unknown placeholders before any work is done."""
    problems = []
    for key in ("prompt_input", "prompt_no_input"):
        template = getattr(templates, key)
        if not isinstance(template, str) or not template:
            problems.append(f"{source}: `{key}` must be a non-empty string")
            continue
        try:
            names = placeholders(template)
        except ValueError as e:
            problems.append(f"{source}: `{key}` is not a valid template ({e}); write literal braces as {{{{ and }}}}")
            continue
        unknown = [n for n in names if n not in ALLOWED_PLACEHOLDERS]
        if unknown:
            problems.append(
                f"{source}: `{key}` uses unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                f"allowed: {{instruction}}, {{input}}"
            )
        if "instruction" not in names:
            problems.append(f"{source}: `{key}` does not use {{instruction}}")
    if not problems and "input" not in placeholders(templates.prompt_input):
        problems.append(f"{source}: `prompt_input` does not use {{input}}, so record inputs would be lost")
    if problems:
        raise ConfigError(problems)


def load_prompts_file(path: str) -> PromptTemplates:
    """A JSON or YAML file with `prompt_input` and `prompt_no_input`, top-level or under `prompts:`."""
    from alpaca_cli.config import read_yaml

    data = read_yaml(path, "prompts file")
    if isinstance(data, dict) and "prompts" in data and isinstance(data["prompts"], dict):
        data = data["prompts"]
    if not isinstance(data, dict):
        raise ConfigError(f"prompts file {path} must hold `prompt_input` and `prompt_no_input`")
    unknown = sorted(set(data) - {"prompt_input", "prompt_no_input"})
    missing = [k for k in ("prompt_input", "prompt_no_input") if k not in data]
    problems = []
    if missing:
        problems.append(f"prompts file {path} lacks {', '.join(missing)}")
    if unknown:
        problems.append(f"prompts file {path} has unknown key(s) {', '.join(unknown)}")
    if problems:
        raise ConfigError(problems)
    templates = PromptTemplates(prompt_input=data["prompt_input"], prompt_no_input=data["prompt_no_input"])
    validate(templates, source=f"prompts file {path}")
    return templates


def has_input(record: Mapping[str, str]) -> bool:
    """Stanford's rule: the input template is used when `input` is present and not the empty string."""
    return record.get("input", "") != ""


def render(templates: PromptTemplates, instruction: str, input: str = "") -> str:
    """The prompt for one record (str.format_map, as Stanford: braces inside the values stay literal)."""
    record = {"instruction": instruction, "input": input}
    template = templates.prompt_input if has_input(record) else templates.prompt_no_input
    return template.format_map(record)


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts a BOS token in front of the text it tokenizes (Llama, Gemma: yes; Qwen: no)."""
    return tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]


def chat_template(templates: PromptTemplates, *, bos: bool) -> str:
    """A Jinja chat template (Hugging Face's format) that renders a user message exactly as training prompted it.

    `apply_chat_template([{"role": "user", "content": X}], add_generation_prompt=True, tokenize=False)` is the
    training prompt for instruction X (the no-input template), preceded by the BOS token's text when the tokenizer
    adds one: chat templates are tokenized without special tokens, so the template carries the BOS itself, and
    tokenizing the rendered text gives the training prompt's ids. A record's input goes in the same message,
    `{"role": "user", "content": X, "input": Y}` (the input template). An assistant message is an answer: its text
    and the EOS, as trained. There is no system prompt in Alpaca's format.
    """

    def expr(template: str, fields: dict[str, str]) -> str:
        out = []
        for literal, name, _, _ in string.Formatter().parse(template):
            if literal:
                escaped = literal.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
                out.append("{{ '" + escaped + "' }}")
            if name is not None:
                out.append("{{ " + fields[name] + " }}")
        return "".join(out)

    with_input = expr(templates.prompt_input, {"instruction": "message['content']", "input": "message['input']"})
    no_input = expr(templates.prompt_no_input, {"instruction": "message['content']"})
    return (
        ("{{ bos_token }}" if bos else "")
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'user' -%}"
        + "{%- if message.get('input') -%}" + with_input + "{%- else -%}" + no_input + "{%- endif -%}"
        + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
        + "{%- else -%}{{ raise_exception('Alpaca prompts have user and assistant messages only, not '"
        + " + message['role']) }}"
        + "{%- endif -%}"
        + "{%- endfor -%}"
    )
