"""Serving the way the run trained: the export ships the chat template the run trained with (its prompt is the
prompt training put before each answer, byte for byte), `alpaca generate --messages` answers a conversation and
stops at the template's end-of-turn token, `alpaca eval` on conversations scores assistant tokens only.

A conversation run here is the tiny trained run (conftest `trained`: Alpaca records, memorised) with its prepare
record saying it was prepared from conversations with a given template (`as_conversation_run`): the template renders
a user message as the Stanford prompt the model memorised, so the model answers conversations as it answers
instructions. Its tokenizer's EOS is made `<unk>`, so that an answer that stops at `</s>` stopped at the template's
end-of-turn token and not at EOS (Llama 3's case: EOS `<|end_of_text|>`, turns closed by `<|eot_id|>`)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import DEMO_TOKENIZER, run_cli, write_jsonl

from alpaca_cli.config import STANFORD_PROMPT_NO_INPUT
from alpaca_cli.rundir import open_run

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STANFORD_CHAT = (  # a --chat-template FILE: Stanford's prompt for a user turn, an answer closed by a literal </s>
    "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '"
    + STANFORD_PROMPT_NO_INPUT.split("{instruction}")[0].replace("\n", "\\n") + "' + m['content'] + '"
    + STANFORD_PROMPT_NO_INPUT.split("{instruction}")[1].replace("\n", "\\n") + "' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)
LLAMA3_LIKE = (  # a --chat-template FILE with a system prompt and headers around every turn
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def conversation() -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo {x} 'q'\n"},
            {"role": "assistant", "content": "Hi — there."}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": ""}, {"role": "user", "content": "Last\tone"},
            {"role": "assistant", "content": "Done."}]


def as_conversation_run(run: str, template: str, *, eos: str | None = None) -> None:
    """Record the run as prepared from conversations with `template` (what prepare --format messages records); eos:
    the run's tokenizer's EOS token made another one."""
    r = open_run(run)
    r.prepare.format, r.prepare.chat_template = "messages", template
    r.save()
    if eos is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(r.tokenizer_dir, name)
            with open(path) as f:
                cfg = json.load(f)
            cfg["eos_token"] = eos
            with open(path, "w") as f:
                json.dump(cfg, f)


def trained_prompt(tok, template: str, messages: list[dict], i: int) -> str:
    """P_i, core.chat's rule: the text training put before assistant message i."""
    return tok.apply_chat_template(messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True)


# -- the end-of-turn token ---------------------------------------------------------------------------------------


def chat_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"]})
    return tok


def test_the_end_of_turn_token_is_what_the_template_closes_an_answer_with():
    from alpaca_cli.config import PromptTemplates
    from alpaca_cli.core.prompts import chat_template
    from alpaca_cli.core.served_template import end_of_turn

    tok = chat_tokenizer()
    ids = tok.convert_tokens_to_ids
    assert end_of_turn(tok, CHATML).ids == (tok.eos_token_id, ids("<|im_end|>"))
    assert end_of_turn(tok, CHATML).text == "<|im_end|>"
    assert end_of_turn(tok, LLAMA3_LIKE).ids == (tok.eos_token_id, ids("<|eot_id|>"))
    assert end_of_turn(tok, chat_template(PromptTemplates(), bos=True)).ids == (tok.eos_token_id,)  # </s> is EOS
    assert end_of_turn(tok, STANFORD_CHAT).ids == (ids("</s>"),) == (tok.eos_token_id,)
    # a closing text that is ordinary text (no token of its own: its first token is `<`) stops nothing
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    assert end_of_turn(plain, CHATML).ids == (plain.eos_token_id,) and end_of_turn(plain, CHATML).text == "<|im_end|>"
    # a template that refuses the probe: EOS only
    assert end_of_turn(tok, "{{ raise_exception('no') }}").ids == (tok.eos_token_id,)


def test_an_answer_stops_at_the_first_end_of_turn_token_of_a_token_stream():
    """The stop rule on a fake token stream: decoding stops at the first token of EndOfTurn.ids (the rule
    decode.generate applies, eos_ids = EndOfTurn.ids), the answer is the text before it, finish "eos"; a stream
    that never closes the turn is cut at max_new_tokens, finish "length"."""
    from alpaca_cli.config import PromptTemplates
    from alpaca_cli.core import decode
    from alpaca_cli.core.generate import Generator

    tok = chat_tokenizer()
    gen = Generator(model=None, tokenizer=tok, templates=PromptTemplates(), max_len=64, mesh=None,
                    chat_template=CHATML)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    words = tok("Hello there", add_special_tokens=False)["input_ids"]
    stream = words + [eot] + tok("\n<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]

    def decode_stream(stream, max_new_tokens, gen=gen):  # the decoder's loop: take tokens until one of eos_ids
        out = []
        for t in stream[:max_new_tokens]:
            out.append(t)
            if t in gen.eos_ids:
                return decode.Generation(out, decode.EOS)
        return decode.Generation(out, decode.LENGTH)

    answer = gen.answer(decode_stream(stream, 50))
    assert (answer.text, answer.finish, answer.new_tokens) == ("Hello there", decode.EOS, len(words) + 1)
    answer = gen.answer(decode_stream(words, 50))
    assert (answer.text, answer.finish) == ("Hello there", decode.LENGTH)
    eos = gen.answer(decode_stream(words + [tok.eos_token_id, 5], 50))
    assert (eos.text, eos.finish) == ("Hello there", decode.EOS)
    assert gen.eos_ids == [tok.eos_token_id, eot]
    # Alpaca records: EOS only, as before
    alpaca = Generator(model=None, tokenizer=tok, templates=PromptTemplates(), max_len=64, mesh=None)
    assert alpaca.eos_ids == [tok.eos_token_id]
    assert alpaca.answer(decode_stream(stream, 50, alpaca)).finish == decode.LENGTH


def test_messages_files_one_conversation_or_many(tmp_path):
    from alpaca_cli.core.generate import read_message_requests
    from alpaca_cli.errors import DataError

    one = str(tmp_path / "one.json")
    with open(one, "w") as f:
        json.dump(conversation(), f)
    [r] = read_message_requests(one)
    assert r.messages == conversation()[:-1] and r.extra == {"reference": "Done."}
    many = write_jsonl(str(tmp_path / "many.jsonl"), [
        {"messages": conversation()[:2]},
        conversation()[1:4],
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}, {"from": "human",
                                                                                               "value": "?"}]}])
    rs = read_message_requests(many)
    assert [r.messages for r in rs] == [conversation()[:2], conversation()[1:4],
                                        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                         {"role": "user", "content": "?"}]]
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [[{"role": "robot", "content": "x"}]])
    with pytest.raises(DataError, match=r"line 1: `messages\[0\].role` is 'robot'; known: system, user"):
        read_message_requests(bad)


# -- export ------------------------------------------------------------------------------------------------------


@pytest.mark.entry
def test_the_export_prompts_as_training_did_for_each_template(trained, tmp_path):
    """For a conversation run (chatml; a template file), transformers' apply_chat_template on the export, with
    add_generation_prompt=True, is the prompt training put before each assistant turn, byte for byte; the export
    carries no Alpaca prompts. For Alpaca records, the export's template is the Alpaca prompts' (as today)."""
    from transformers import AutoTokenizer

    from alpaca_cli.config import PromptTemplates
    from alpaca_cli.core.prompts import PROMPTS_FILE, chat_template

    run, _, _ = trained
    alpaca = str(tmp_path / "alpaca")
    run_cli(["export", "--run-dir", run, "--output", alpaca])
    assert AutoTokenizer.from_pretrained(alpaca).chat_template == chat_template(PromptTemplates(), bos=True)
    assert os.path.exists(os.path.join(alpaca, PROMPTS_FILE))
    messages = conversation()
    for name, template in (("chatml", CHATML), ("file", LLAMA3_LIKE)):
        as_conversation_run(run, template)
        folder = str(tmp_path / name)
        run_cli(["export", "--run-dir", run, "--output", folder])
        exported = AutoTokenizer.from_pretrained(folder)
        tok = open_run(run).load_tokenizer()
        assert exported.chat_template == template and not os.path.exists(os.path.join(folder, PROMPTS_FILE))
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in turns:
            served = exported.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            assert served == trained_prompt(tok, template, messages, i), (name, i)
        card = open(os.path.join(folder, "README.md")).read()
        assert template in card and "### Instruction:" not in card


# -- generate and eval on a tiny model ---------------------------------------------------------------------------


def memorised(records):
    """The memorised records a single user turn asks for: without an input (a conversation's user turn is the
    instruction alone; record 2 has none either but training cut it at 128 tokens)."""
    return [records[0], records[5]]


@pytest.mark.entry
def test_generate_answers_a_conversation_and_stops_at_the_end_of_turn_token(trained, tmp_path):
    """The model memorised `output</s>` after Stanford's prompt; with EOS made `<unk>`, only the template's end of
    turn (`</s>`) stops it: the answer is the memorised output, whole, and nothing after it."""
    from alpaca_cli.core.served_template import prompt_ids

    run, _, records = trained
    records = memorised(records)
    as_conversation_run(run, STANFORD_CHAT, eos="<unk>")
    tok = open_run(run).load_tokenizer()
    assert tok.eos_token == "<unk>"
    r = records[0]
    user = {"role": "user", "content": r["instruction"]}
    # the prompt is the one training tokenized (Stanford's prompt after the BOS)
    assert prompt_ids(tok, STANFORD_CHAT, [user]) == tok(STANFORD_PROMPT_NO_INPUT.format(instruction=r["instruction"]))[
        "input_ids"]
    one = str(tmp_path / "one.json")
    with open(one, "w") as f:
        json.dump([user], f)
    out = run_cli(["generate", "--messages", one, "--run-dir", run, "--max-new-tokens", "200"])
    assert out.stdout.rstrip("\n") == r["output"]

    convs = [[{"role": "user", "content": x["instruction"]}, {"role": "assistant", "content": "ref"}] for x in records]
    many, answers = write_jsonl(str(tmp_path / "many.jsonl"), convs), str(tmp_path / "answers.jsonl")
    run_cli(["generate", "--messages", many, "--output", answers, "--run-dir", run, "--max-new-tokens", "200",
             "--generator", "tiny"])
    got = [json.loads(line) for line in open(answers)]
    assert [g["output"] for g in got] == [x["output"] for x in records]
    assert got[0] == {"messages": convs[0][:1], "output": records[0]["output"], "generator": "tiny",
                      "reference": "ref"}


@pytest.mark.entry
def test_eval_on_conversations_scores_assistant_tokens_and_stops_at_end_of_turn(trained, tmp_path):
    """The trained-token count equals an independent count of the tokens inside the assistant turns' trained spans
    ([len(P_i), len(R_i.rstrip())) of the rendered text); longer user turns do not change it; every answer stops at
    the end-of-turn token (EOS is `<unk>` here)."""
    run, _, records = trained
    a, b = memorised(records)
    as_conversation_run(run, STANFORD_CHAT, eos="<unk>")
    tok = open_run(run).load_tokenizer()

    def conv(user_suffix=""):
        c = a
        return [
            [{"role": "user", "content": a["instruction"] + user_suffix}, {"role": "assistant", "content": a["output"]}],
            {"messages": [{"role": "user", "content": b["instruction"] + user_suffix},
                          {"role": "assistant", "content": b["output"]}]},
            {"conversations": [{"from": "human", "value": c["instruction"] + user_suffix},
                               {"from": "gpt", "value": c["output"]}]},
        ]

    def scores(data):
        path = write_jsonl(str(tmp_path / "held_out.jsonl"), data)
        return json.loads(run_cli(["eval", "--data", path, "--run-dir", run, "--json", "--max-new-tokens",
                                   "200"]).stdout)[0]

    expected = sum(independent_trained_count(tok, STANFORD_CHAT, _messages_of(c)) for c in conv())
    got = scores(conv())
    assert all(len(tok(tok.apply_chat_template(c, chat_template=STANFORD_CHAT, tokenize=False))["input_ids"]) < 128
               for c in map(_messages_of, conv(" and some more words of the user")))  # nothing truncated
    assert got["trained_tokens"] == expected > 0
    assert got["eos_stop_rate"] == 1.0 and got["eos_stopped"] == got["prompts"] == 3
    assert got["loss"] < 0.1
    assert scores(conv(" and some more words of the user"))["trained_tokens"] == expected


def _messages_of(row) -> list[dict]:
    if isinstance(row, list):
        return row
    if "messages" in row:
        return row["messages"]
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]


def independent_trained_count(tok, template: str, messages: list[dict]) -> int:
    """Tokens of the whole rendering (offsets) whose span meets an assistant turn's trained characters."""
    full = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(trained_prompt(tok, template, messages, i))
            end = len(tok.apply_chat_template(messages[: i + 1], chat_template=template, tokenize=False).rstrip())
            spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    return sum(1 for s, e in enc["offset_mapping"] if e > s and any(s < b and a < e for a, b in spans))


def test_eval_tokenizes_conversations_with_the_served_template():
    """evaluate.trained_tokens: a conversation's trained tokens are its assistant turns' (system, user and headers
    not), counted as the independent count counts them, with the template the model is served with."""
    from alpaca_cli.config import PrepareConfig, PromptTemplates
    from alpaca_cli.core import evaluate
    from alpaca_cli.core.generate import Generator

    tok = chat_tokenizer()
    gen = Generator(model=None, tokenizer=tok, templates=PromptTemplates(), max_len=512, mesh=None,
                    chat_template=LLAMA3_LIKE)
    convs = [conversation(), conversation()[1:3]]
    held = evaluate.HeldOut([], [], conversations=convs)
    tokenized = evaluate.trained_tokens(gen, held, PrepareConfig(max_length=512))
    count = sum(int(sum(t)) for t in tokenized.targets)
    assert count == sum(independent_trained_count(tok, LLAMA3_LIKE, c) for c in convs) > 0
    trained_text = "".join(tok.decode([i for i, t in zip(ids, ts) if t]) for ids, ts in
                           zip(tokenized.input_ids, tokenized.targets))
    assert "Be brief" not in trained_text and "Héllo" not in trained_text and "Done." in trained_text


def test_a_conversation_runs_card_shows_its_chat_template(tmp_path):
    from huggingface_hub import ModelCard
    from test_model_card import VERIFIED, run_dir

    from alpaca_cli.core.model_card import write_model_card

    run = run_dir(tmp_path)
    run.prepare.format, run.prepare.chat_template = "messages", CHATML
    write_model_card(run, str(tmp_path), step=3, dtype="float32", summary=VERIFIED)
    text = ModelCard.load(tmp_path / "README.md").text
    assert CHATML in text and "assistant turns trained" in text
    assert "### Instruction:" not in text and "prompt tokens masked" not in text


def test_generate_takes_one_of_an_instruction_a_file_or_messages(tmp_path):
    from helpers import error_line

    one = str(tmp_path / "one.json")
    with open(one, "w") as f:
        json.dump(conversation(), f)
    out = run_cli(["generate", "Hi", "--messages", one, "--run-dir", str(tmp_path / "none")], check=False)
    assert out.returncode != 0 and "give one of an INSTRUCTION, --file or --messages" in error_line(out)
