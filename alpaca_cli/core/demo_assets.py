"""The built-in demo: a small data set, tokenizer and tiny Llama-shaped model shipped with the package.

They make the whole pipeline runnable offline on a laptop (`--data demo`, `--tokenizer demo`, `--model demo`)
and can be mixed with your own data, tokenizer or model.
"""

from __future__ import annotations

from importlib import resources

BUILTIN = "demo"


def asset(*parts: str) -> str:
    return str(resources.files("alpaca_cli").joinpath("assets", *parts))


def resolve_builtin_data(value: str | None) -> str | None:
    return asset("demo_data.jsonl") if value == BUILTIN else value


def resolve_builtin_tokenizer(value: str | None) -> str | None:
    return asset("demo_tokenizer") if value == BUILTIN else value
