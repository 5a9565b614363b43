"""Serving the way the run trained: the one chat template a run is served with (its export's, generate's, eval's),
the prompt it gives a conversation, and the tokens that end an answer.

The template is the run's (`run_chat_template`): for a run prepared from conversations, the Jinja text prepare
recorded as it used it (`PrepareRecord.chat_template`); for Alpaca records, the template that renders a user message
as the training prompt (prompts.chat_template). A prompt is the template's rendering of the conversation with
add_generation_prompt=True, tokenized without special tokens (the template puts the BOS itself, as
apply_chat_template does): the P_i of core.chat's labels, the text training put before the answer it trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from alpaca_cli.errors import DataError

logger = logging.getLogger(__name__)

_PROBE_USER, _PROBE_ANSWER = "Q7probe", "A7probe"
"""The probe conversation end_of_turn renders: words no template rewrites (no whitespace to strip)."""


def run_chat_template(prep, tok) -> str:
    """The chat template the run trained with (prep: the run's PrepareRecord; tok: its tokenizer): the conversation
    template as prepare used it, else (Alpaca records) the template that renders a user message as training
    prompted it. What the export ships, and what generate and eval render with."""
    if getattr(prep, "chat_template", None) is not None:
        return prep.chat_template
    from alpaca_cli.core.prompts import adds_bos, chat_template

    return chat_template(prep.config.prompts, bos=adds_bos(tok))


def render(tok, template: str, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    """The template's text for the messages, by transformers' own Jinja machinery (as core.chat renders)."""
    return tok.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def prompt_ids(tok, template: str, messages: Sequence[dict]) -> list[int]:
    """The tokens that prompt the next assistant turn, as training put them before an answer."""
    text = render(tok, template, messages, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class EndOfTurn:
    """What ends an answer: the tokenizer's EOS and the template's end-of-turn token (the token that closes an
    assistant turn: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>` ...)."""

    ids: tuple[int, ...]
    """Token ids decoding stops at."""
    text: str = ""
    """The text the template puts after an answer's content (whitespace after it stripped); empty when unknown."""

    def finish(self, tokens: Sequence[int]) -> tuple[list[int], bool]:
        """A decoded answer's tokens without what ended it, and whether it ended on its own (at EOS or the
        end-of-turn token: the last token is one of `ids`)."""
        tokens = list(tokens)
        if tokens and tokens[-1] in self.ids:
            return tokens[:-1], True
        return tokens, False


def end_of_turn(tok, template: str) -> EndOfTurn:
    """EOS and the template's end-of-turn token, found by rendering a probe conversation: the closing text is what
    the template puts after the answer's content in R = render([user, assistant]) beyond P = render([user],
    add_generation_prompt=True) (core.chat's trained span, less the content); its first token ends the turn when it
    is a token of its own (a special or added token: `<|im_end|>`, not a `<` that starts ordinary text)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    text = closing_text(tok, template)
    ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
    own = set(getattr(tok, "all_special_ids", [])) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    if ids and ids[0] in own:
        return EndOfTurn(tuple(dict.fromkeys(eos + [ids[0]])), text)
    if text:
        logger.info("the template closes a turn with %r, which is not one token; answers stop at EOS", text)
    return EndOfTurn(tuple(eos), text)


def closing_text(tok, template: str) -> str:
    """What the template puts after an assistant message's content (trailing whitespace stripped), or "" when the
    probe cannot tell (the template refuses it, or rewrites the content)."""
    user = {"role": "user", "content": _PROBE_USER}
    try:
        p = render(tok, template, [user], add_generation_prompt=True)
        r = render(tok, template, [user, {"role": "assistant", "content": _PROBE_ANSWER}], add_generation_prompt=False)
    except Exception as e:  # a template that raises on the probe: answers stop at EOS
        logger.info("the chat template refused a probe conversation (%s); answers stop at EOS", e)
        return ""
    at = r.find(_PROBE_ANSWER, len(p) if r.startswith(p) else 0)
    return r[at + len(_PROBE_ANSWER):].rstrip() if at >= 0 else ""


def instruction_message(instruction: str, input: str = "") -> dict:
    """An Alpaca request as a conversation's user message: the instruction, and its input after a blank line."""
    return {"role": "user", "content": instruction + ("\n\n" + input if input else "")}


# -- files of conversations ------------------------------------------------------------------------------------------


def read_conversations(path: str, flag: str = "--messages") -> list[list[dict]]:
    """A JSON file of one conversation (a list of {role, content}), or a .json/.jsonl of conversations (each a list
    of messages, {"messages": [...]}, or ShareGPT's {"conversations": [{from, value}]}); local or remote. Read and
    checked as prepare reads conversations (core.chat), without needing an assistant turn."""
    from alpaca_cli.core import chat
    from alpaca_cli.core.data import read_rows

    rows = read_rows(path, flag)
    if rows and all(isinstance(r, dict) and "role" in r for _, r in rows):  # one conversation, a message a row
        rows = [("", {"messages": [r for _, r in rows]})]
    out = []
    for where, row in rows:
        where = f"{flag} {path} {where}".rstrip()
        record = {"messages": row} if isinstance(row, list) else row
        fmt = chat.detect_format(record, where=where)
        if fmt == "alpaca":
            raise DataError(f"{where}: not a conversation; give a list of {{role, content}}, or an object with "
                            "`messages` or ShareGPT's `conversations`")
        out.append(chat.to_messages(record, fmt, where=where, need_assistant=False))
    if not out:
        raise DataError(f"{flag} {path}: holds no conversation")
    return out


def split_reference(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """A conversation to answer, and its reference answer: a final assistant message is the answer to compare
    with (generate answers that turn again); otherwise there is none."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None
