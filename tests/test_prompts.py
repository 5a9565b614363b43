"""Prompt templates: Stanford's byte for byte, Stanford's choice of template, validation before any work."""

import json

import pytest

from alpaca_cli.config import PromptTemplates
from alpaca_cli.core import prompts
from alpaca_cli.errors import ConfigError

# Copied from tatsu-lab/stanford_alpaca train.py (PROMPT_DICT), not from our code.
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_default_templates_are_stanfords_byte_for_byte():
    t = PromptTemplates()
    assert t.prompt_input == STANFORD_INPUT
    assert t.prompt_no_input == STANFORD_NO_INPUT


def test_render_golden_strings():
    t = PromptTemplates()
    assert prompts.render(t, "Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n"
        "2 and 3\n\n### Response:"
    )
    assert prompts.render(t, "Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:"
    )


def test_template_choice_follows_stanford_rule():
    t = PromptTemplates()
    assert "### Input:" in prompts.render(t, "x", " ")  # a space is not the empty string
    assert "### Input:" not in prompts.render(t, "x", "")


def test_braces_in_values_stay_literal():
    t = PromptTemplates()
    out = prompts.render(t, "use {input} and {0}", "{instruction}}")
    assert "use {input} and {0}" in out and "{instruction}}" in out


@pytest.mark.parametrize(
    "template,message",
    [
        ("{instruction} {inputs}", r"unknown placeholder\(s\) \{inputs\}"),
        ("{instruction} {", "not a valid template"),
        ("no placeholder", r"does not use \{instruction\}"),
        ("{instruction} {output}", r"unknown placeholder\(s\) \{output\}"),
    ],
)
def test_bad_templates_are_rejected(template, message):
    with pytest.raises(ConfigError, match=message):
        prompts.validate(PromptTemplates(prompt_input=template, prompt_no_input="{instruction}"))


def test_prompts_file_json_yaml_and_tutorial_block(tmp_path):
    data = {"prompt_input": "I: {instruction}\nIn: {input}\nR:", "prompt_no_input": "I: {instruction}\nR:"}
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.yaml").write_text(
        "prompts:\n  prompt_input: |-\n    I: {instruction}\n    In: {input}\n    R:\n"
        "  prompt_no_input: |-\n    I: {instruction}\n    R:\n"
    )
    for name in ("p.json", "p.yaml"):
        t = prompts.load_prompts_file(str(tmp_path / name))
        assert (t.prompt_input, t.prompt_no_input) == (data["prompt_input"], data["prompt_no_input"])
    (tmp_path / "bad.json").write_text(json.dumps({"prompt_input": "{instruction}{input}"}))
    with pytest.raises(ConfigError, match="lacks prompt_no_input"):
        prompts.load_prompts_file(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        prompts.load_prompts_file(str(tmp_path / "missing.json"))
