"""alpaca prepare on conversations (messages, ShareGPT): the cache holds the assistant-only labels an independent
computation gives (transformers' own `return_assistant_tokens_mask` on a `{% generation %}`-marked template that
renders identically), and everything prepare promises around it."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from helpers import prepared_examples, read_records, run_cli, table_rows, write_jsonl

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import chat
from alpaca_cli.core.prepare import prepare
from alpaca_cli.errors import ConfigError, DataError, StageError
from alpaca_cli.rundir import open_run

IM = ("<|im_start|>", "<|im_end|>")

# ChatML with {% generation %} around what the assistant writes (content and <|im_end|>, not the "\n" after it):
# transformers' return_assistant_tokens_mask on it is the oracle. It must render exactly as the built-in chatml.
MARKED_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LONG = " ".join(f"word{i}" for i in range(300))
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4, of course."}],
    [{"role": "user", "content": "Ünïcødé: héllo 東京 😀 \"quotes\" {braces}"},
     {"role": "assistant", "content": "Bien reçu 😀\nline two"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
    [{"role": "user", "content": "Write at length."}, {"role": "assistant", "content": LONG}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Use the tool."},
     {"role": "assistant", "content": "calling"}, {"role": "tool", "content": "{\"ok\": true}"},
     {"role": "assistant", "content": "Done."}],
]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def as_messages(conversations):
    return [{"messages": c} for c in conversations]


def as_sharegpt(conversations):
    return [{"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in c]}
            for c in conversations]


@pytest.fixture(scope="module")
def instruct_tokenizer_dir(tmp_path_factory, chatml_tokenizer_dir) -> str:
    """An "instruct" tokenizer: its own chat_template (ChatML)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    tok.chat_template = chat.BUILTIN_TEMPLATES["chatml"]
    path = str(tmp_path_factory.mktemp("instruct-tok"))
    tok.save_pretrained(path)
    return path


def run_prepare(tmp_path, data, tokenizer, name="run", **kw):
    cfg = PrepareConfig(data=data, tokenizer=tokenizer, **kw)
    run = open_run(str(tmp_path / name), create=True)
    return prepare(cfg, run), run


def oracle(tokenizer_dir, conversations, *, max_length=512, template=MARKED_CHATML):
    """{index: (input_ids, labels)} from transformers' apply_chat_template(return_assistant_tokens_mask=True),
    truncated to max_length, without the examples that train nothing (prepare drops those)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({k: v for k, v in {"pad_token": "[PAD]"}.items() if tok.pad_token is None})
    out = {}
    for i, conv in enumerate(conversations):
        enc = tok.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        labels[0] = -100
        if any(x != -100 for x in labels):
            out[i] = (ids, labels)
    return out


def cache_files(run) -> dict[str, bytes]:
    """The cache's arrays, file by file (not the ledger and seal, which name the inputs' fingerprint)."""
    root = os.path.join(run.url, "data", "cache")
    out = {}
    for field in ("input_ids", "targets", "source_index"):
        for dirpath, _, files in os.walk(os.path.join(root, field)):
            for f in files:
                path = os.path.join(dirpath, f)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    assert out
    return out


def test_marked_chatml_renders_as_the_builtin(chatml_tokenizer_dir):
    """The oracle's template is the built-in chatml, character for character, with and without a generation
    prompt, on every test conversation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            a = tok.apply_chat_template(conv, chat_template=MARKED_CHATML, tokenize=False, add_generation_prompt=gen)
            b = tok.apply_chat_template(conv, chat_template=chat.BUILTIN_TEMPLATES["chatml"], tokenize=False,
                                        add_generation_prompt=gen)
            assert a == b


@pytest.mark.parametrize("max_length", [512, 40])
def test_chatml_messages_cache_equals_the_oracle(tmp_path, chatml_tokenizer_dir, max_length):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    result, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, format="messages", chat_template="chatml",
                              max_length=max_length)
    expected = oracle(chatml_tokenizer_dir, CONVERSATIONS, max_length=max_length)
    got = prepared_examples(run.url)
    assert got == expected
    # the closing token is trained, the header is not
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = expected[0] if max_length == 512 else oracle(chatml_tokenizer_dir, CONVERSATIONS)[0]
    assert labels.count(end) == 2 and sum(1 for t in ids if t == end) == 5
    assert tok.convert_tokens_to_ids("<|im_start|>") not in labels
    s = result.stats
    if max_length == 40:
        assert s["truncated"] > 0 and s["truncated"] == sum(
            1 for c in CONVERSATIONS
            if len(tok.apply_chat_template(c, chat_template=MARKED_CHATML, tokenize=True)) > 40)
        assert s["dropped"]["no_trained_tokens"] == len(CONVERSATIONS) - len(expected)
        cut, beyond = turns_cut(tok, CONVERSATIONS, 40)
        assert cut > 0 and beyond > 0
        assert (s["cut_in_turn"], s["turns_beyond_limit"]) == (cut, beyond)
        assert s["trained_turns"] == s["assistant_turns"] - beyond


def turns_cut(tok, conversations, max_length) -> tuple[int, int]:
    """(assistant turns cut inside by max_length, assistant turns wholly beyond it), from per-turn oracles: the
    marked template with only the k-th assistant message in {% generation %}."""
    cut = beyond = 0
    for conv in conversations:
        n_assistant = sum(m["role"] == "assistant" for m in conv)
        for k in range(n_assistant):
            only_k = (
                "{%- set ns = namespace(seen=0) -%}{%- for message in messages -%}"
                "{%- if message['role'] == 'assistant' -%}{%- set ns.seen = ns.seen + 1 -%}"
                "{{ '<|im_start|>assistant\\n' }}"
                f"{{%- if ns.seen == {k + 1} -%}}"
                "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                "{%- else -%}{{ message['content'] + '<|im_end|>' }}{%- endif -%}{{ '\\n' }}"
                "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                "{%- endif -%}{%- endfor -%}"
            )
            enc = tok.apply_chat_template(conv, chat_template=only_k, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            assert tok.apply_chat_template(conv, chat_template=only_k, tokenize=False) == \
                tok.apply_chat_template(conv, chat_template=MARKED_CHATML, tokenize=False)
            mask = enc["assistant_masks"]
            if len(mask) <= max_length:
                continue
            whole, kept = sum(mask[1:]), sum(mask[1:max_length])
            cut += int(0 < kept < whole)
            beyond += int(kept == 0 and whole > 0)
    return cut, beyond


def test_sharegpt_and_messages_give_byte_identical_caches(tmp_path, chatml_tokenizer_dir):
    m = write_jsonl(str(tmp_path / "m.jsonl"), as_messages(CONVERSATIONS))
    g = write_jsonl(str(tmp_path / "g.jsonl"), as_sharegpt(CONVERSATIONS))
    a, ra = run_prepare(tmp_path, m, chatml_tokenizer_dir, name="m", chat_template="chatml")
    b, rb = run_prepare(tmp_path, g, chatml_tokenizer_dir, name="g", chat_template="chatml")
    assert cache_files(ra) == cache_files(rb)
    # LLaMA-Factory's ShareGPT: the system prompt in a `system` field beside the turns
    beside = []
    for row in as_sharegpt(CONVERSATIONS):
        turns = row["conversations"]
        system = [t["value"] for t in turns if t["from"] == "system"]
        beside.append({"conversations": [t for t in turns if t["from"] != "system"], **({"system": system[0]}
                                                                                         if system else {})})
    s = write_jsonl(str(tmp_path / "s.jsonl"), beside)
    _, rs = run_prepare(tmp_path, s, chatml_tokenizer_dir, name="s", chat_template="chatml")
    assert cache_files(rs) == cache_files(ra)
    # ShareGPT turns ({from, value}) under a `messages` field, as some Hub datasets have them
    under = write_jsonl(str(tmp_path / "u.jsonl"), [{"messages": r["conversations"]} for r in as_sharegpt(CONVERSATIONS)])
    _, ru = run_prepare(tmp_path, under, chatml_tokenizer_dir, name="u", chat_template="chatml")
    assert cache_files(ru) == cache_files(ra) and open_run(ru.url).prepare.format == "sharegpt"
    assert a.fingerprint != b.fingerprint  # different data, same cache
    # --format auto found each
    assert (open_run(ra.url).prepare.format, open_run(rb.url).prepare.format) == ("messages", "sharegpt")


def test_format_auto_detects_alpaca_records_too(tmp_path, fixture_data, tokenizer_dir):
    auto, ra = run_prepare(tmp_path, fixture_data, tokenizer_dir, name="auto")
    explicit, rb = run_prepare(tmp_path, fixture_data, tokenizer_dir, name="alpaca", format="alpaca")
    assert open_run(ra.url).prepare.format == "alpaca" and open_run(ra.url).prepare.chat_template is None
    assert cache_files(ra) == cache_files(rb) and auto.fingerprint == explicit.fingerprint


def test_explicit_format_that_does_not_fit_names_the_record(tmp_path, chatml_tokenizer_dir):
    g = write_jsonl(str(tmp_path / "g.jsonl"), as_sharegpt(CONVERSATIONS))
    with pytest.raises(DataError, match=r"line 1: field `messages` is missing \(fields present: conversations"):
        run_prepare(tmp_path, g, chatml_tokenizer_dir, format="messages", chat_template="chatml")
    mixed = write_jsonl(str(tmp_path / "mixed.jsonl"), as_messages(CONVERSATIONS[:2]) + as_sharegpt(CONVERSATIONS[:1]))
    with pytest.raises(DataError, match=r"line 3: a sharegpt record, but line 1 is a messages one"):
        run_prepare(tmp_path, mixed, chatml_tokenizer_dir, chat_template="chatml")
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"line 1: the conversation has no assistant turn"):
        run_prepare(tmp_path, bad, chatml_tokenizer_dir, chat_template="chatml")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_field_mapping(tmp_path, chatml_tokenizer_dir):
    m = write_jsonl(str(tmp_path / "m.jsonl"), as_messages(CONVERSATIONS))
    d = write_jsonl(str(tmp_path / "d.jsonl"), [{"dialog": c, "id": i} for i, c in enumerate(CONVERSATIONS)])
    _, ra = run_prepare(tmp_path, m, chatml_tokenizer_dir, name="m", chat_template="chatml")
    _, rb = run_prepare(tmp_path, d, chatml_tokenizer_dir, name="d", chat_template="chatml", messages_field="dialog")
    assert cache_files(ra) == cache_files(rb)


def test_base_tokenizer_without_template_is_refused_in_one_line_and_nothing_is_written(tmp_path, tokenizer_dir):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    with pytest.raises(ConfigError) as e:
        run_prepare(tmp_path, data, tokenizer_dir, format="messages")
    assert "\n" not in str(e.value)
    assert "no chat template" in str(e.value) and "--chat-template FILE|chatml|alpaca" in str(e.value)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_the_cli_refuses_a_base_tokenizer_without_template_in_one_line(tmp_path, tokenizer_dir):
    from helpers import error_line

    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    proc = run_cli(["prepare", "--data", data, "--tokenizer", tokenizer_dir, "--run-dir", str(tmp_path / "r")],
                   check=False)
    assert proc.returncode == 1 and "the tokenizer has no chat template" in error_line(proc)
    assert "pass --chat-template FILE|chatml|alpaca" in proc.stderr
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_the_tokenizers_own_template_is_the_default_and_recorded(tmp_path, instruct_tokenizer_dir,
                                                                 chatml_tokenizer_dir):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    own, ra = run_prepare(tmp_path, data, instruct_tokenizer_dir, name="own")
    assert prepared_examples(ra.url) == oracle(chatml_tokenizer_dir, CONVERSATIONS)
    record = open_run(ra.url).prepare
    assert record.chat_template == chat.BUILTIN_TEMPLATES["chatml"] and record.format == "messages"
    assert own.stats["chat_template"] == "tokenizer"


def test_a_changed_chat_template_is_a_different_preparation(tmp_path, chatml_tokenizer_dir):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    first, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="chatml")
    same_text = tmp_path / "chatml.jinja"
    same_text.write_text(chat.BUILTIN_TEMPLATES["chatml"])
    again, _ = run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template=str(same_text))
    assert again.reused  # the same text from a file is the same preparation
    edited = tmp_path / "edited.jinja"
    edited.write_text(chat.BUILTIN_TEMPLATES["chatml"].replace("'\\n' }}{%- endfor", "'\\n\\n' }}{%- endfor"))
    with pytest.raises(StageError, match=r"differs in --chat-template\).*--overwrite"):
        run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template=str(edited))
    with pytest.raises(StageError, match=r"differs in --train-on"):
        run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="chatml", train_on="last")
    with pytest.raises(StageError, match=r"differs in .*--chat-template"):
        run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="alpaca")
    assert open_run(run.url).prepare.fingerprint == first.fingerprint


def test_alpaca_template_on_single_turns_gives_the_alpaca_records_cache(tmp_path, fixture_data, tokenizer_dir):
    records = [r for r in read_records(fixture_data) if r.get("input", "") == ""]
    assert len(records) >= 5
    alpaca = write_jsonl(str(tmp_path / "alpaca.jsonl"), records)
    convs = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
             for r in records]
    chatfile = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(convs))
    for max_length in (512, 64):
        a, ra = run_prepare(tmp_path, alpaca, tokenizer_dir, name=f"a{max_length}", max_length=max_length)
        c, rc = run_prepare(tmp_path, chatfile, tokenizer_dir, name=f"c{max_length}", chat_template="alpaca",
                            max_length=max_length)
        assert prepared_examples(rc.url) == prepared_examples(ra.url)
        assert cache_files(rc) == cache_files(ra)
        assert (c.stats["dropped"], c.stats["truncated"]) == (a.stats["dropped"], a.stats["truncated"])


def test_train_on_last(tmp_path, chatml_tokenizer_dir):
    last_only = MARKED_CHATML.replace(
        "{%- if message['role'] == 'assistant' -%}",
        "{%- if message['role'] == 'assistant' and loop.index0 == ns.last -%}",
    )
    last_only = ("{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
                 "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}" + last_only)
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    result, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="chatml", train_on="last")
    assert prepared_examples(run.url) == oracle(chatml_tokenizer_dir, CONVERSATIONS, template=last_only)
    assert result.stats["trained_turns"] == len(CONVERSATIONS)


# The system prompt goes into the LAST user message (as older Mistral-Instruct templates do): the full rendering of a
# conversation with two user turns is not the concatenation of its turns' renderings (R_1 holds the system prompt in
# the first user message, F holds it in the second).
SYSTEM_LAST = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and system is defined -%}"
    "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else -%}{{ '[INST] ' + m['content'] + '[/INST]' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def test_a_template_that_rewrites_earlier_turns_trains_turn_by_turn_and_says_so(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    convs = [c for c in CONVERSATIONS if "tool" not in {m["role"] for m in c}]
    template = tmp_path / "system_last.jinja"
    template.write_text(SYSTEM_LAST)
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(convs))
    result, run = run_prepare(tmp_path, data, tokenizer_dir, chat_template=str(template), max_length=4096)
    with_system = [i for i, c in enumerate(convs) if c[0]["role"] == "system"]
    assert result.stats["split_conversations"] == len(with_system) == 1
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    c = open_run(run.url)
    from alpaca_cli.core import cache as cachemod

    rows = cachemod.open_run_cache(c).rows(range(result.stats["examples"]))
    split = [r for r in rows if int(r["source_index"][0]) == with_system[0]]
    assistants = [i for i, m in enumerate(convs[with_system[0]]) if m["role"] == "assistant"]
    assert len(split) == len(assistants)
    for row, i in zip(split, assistants):
        turn = convs[with_system[0]][: i + 1]
        # each example is R_i, the conversation as the template renders it at that turn (system prompt in the last
        # user message), with only turn i trained: its content and the EOS
        expected_text = tok.apply_chat_template(turn, chat_template=SYSTEM_LAST, tokenize=False)
        assert tok.decode(row["input_ids"].tolist(), skip_special_tokens=False) == expected_text
        trained = row["input_ids"][row["targets"].astype(bool)].tolist()
        assert tok.decode(trained).strip() == turn[-1]["content"] + tok.eos_token
        assert trained[-1] == tok.eos_token_id
    assert result.stats["examples"] == len(convs) - 1 + len(assistants)


def test_stats_count_turns_roles_and_trained_tokens_and_the_cli_table_shows_them(tmp_path, chatml_tokenizer_dir):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    run = str(tmp_path / "run")
    out = run_cli(["prepare", "--data", data, "--format", "messages", "--chat-template", "chatml", "--tokenizer",
                   chatml_tokenizer_dir, "--run-dir", run, "--max-length", "64"])
    stats = json.loads(open(open_run(run).stats_path).read())
    expected = oracle(chatml_tokenizer_dir, CONVERSATIONS, max_length=64)
    roles = Counter(m["role"] for c in CONVERSATIONS for m in c)
    assert stats["conversations"] == stats["records_read"] == len(CONVERSATIONS)
    assert stats["turns"] == sum(len(c) for c in CONVERSATIONS)
    assert stats["roles"] == {r: roles.get(r, 0) for r in ("system", "user", "assistant", "tool")}
    assert stats["trained_tokens"] == sum(sum(1 for x in lab if x != -100) for _, lab in expected.values())
    assert stats["assistant_turns"] == roles["assistant"]
    rows = table_rows(out.stdout)
    assert rows["conversations read"] == str(len(CONVERSATIONS))
    assert rows["turns (system / user / assistant / tool)"] == (
        f"{stats['turns']} ({roles['system']} / {roles['user']} / {roles['assistant']} / {roles['tool']})")
    assert rows["trained tokens"].startswith(f"{stats['trained_tokens']:,} (")
    assert rows["assistant turns trained (--train-on all)"] == f"{stats['trained_turns']} of {roles['assistant']}"
    assert rows["format / chat template"] == "messages / chatml"

    shown = run_cli(["inspect", "--run-dir", run, "--index", "0", "--count", "1"])
    assert "conversation 0:" in shown.stdout and "trained in 2 assistant spans" in shown.stdout


def test_inspect_sets_the_trained_tokens_apart(tmp_path, chatml_tokenizer_dir):
    from transformers import AutoTokenizer

    from alpaca_cli.commands.inspect import render_example
    from alpaca_cli.core import cache as cachemod

    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS[:2]))
    _, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="chatml")
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    for row, conv in zip(cachemod.open_run_cache(open_run(run.url)).rows(range(2)), CONVERSATIONS):
        text = render_example(tok, row, conversation=True)
        green = [text.plain[s.start : s.end] for s in text.spans if s.style == "bold green"]
        assert [g.strip() for g in green] == [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        dim = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "dim")
        assert "<|im_start|>assistant" in dim and "<|im_end|>" in dim  # headers and other turns' closers are masked


def test_alpaca_records_refuse_conversation_options(tmp_path, fixture_data, tokenizer_dir):
    with pytest.raises(ConfigError, match="apply to conversations"):
        run_prepare(tmp_path, fixture_data, tokenizer_dir, chat_template="chatml")
    with pytest.raises(ConfigError, match="apply to conversations"):
        PrepareConfig(format="alpaca", train_on="last")
    with pytest.raises(ConfigError, match=r"format \(--format\) must be one of"):
        PrepareConfig(format="openai")
    chat_data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    with pytest.raises(ConfigError, match="--no-mask-inputs applies to Alpaca records"):
        run_prepare(tmp_path, chat_data, tokenizer_dir, chat_template="chatml", mask_inputs=False)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_held_out_conversations_are_prepared_like_the_training_data(tmp_path, chatml_tokenizer_dir):
    from alpaca_cli.core import cache as cachemod
    from alpaca_cli.core.prepare import prepare_validation

    data = write_jsonl(str(tmp_path / "chat.jsonl"), as_messages(CONVERSATIONS))
    val = write_jsonl(str(tmp_path / "val.jsonl"), as_sharegpt(CONVERSATIONS[:3]))
    _, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, chat_template="chatml")
    cache_dir = prepare_validation(open_run(run.url), val)
    c = cachemod.open_cache(cache_dir)
    got = {int(r["source_index"][0]): (r["input_ids"].tolist(), cachemod.labels(r["input_ids"], r["targets"]).tolist())
           for r in c.rows(range(len(c)))}
    assert got == oracle(chatml_tokenizer_dir, CONVERSATIONS[:3])
    alpaca = write_jsonl(str(tmp_path / "alpaca.jsonl"), [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="holds alpaca records, but the run was prepared from messages ones"):
        prepare_validation(open_run(run.url), alpaca)


HUB_UPLOAD = r"""
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("tester/mini-chat", repo_type="dataset", exist_ok=True)
api.upload_file(path_or_fileobj=sys.argv[1], path_in_repo="data/train.jsonl", repo_id="tester/mini-chat",
                repo_type="dataset")
"""


@pytest.mark.entry
def test_conversations_from_a_hub_dataset(tmp_path, chatml_tokenizer_dir):
    """A Hub dataset of conversations (through `datasets`, whose Arrow rows hold null for a key a message lacks):
    the same cache as the file."""
    import subprocess
    import sys

    from fake_hub import FakeHub
    from helpers import cli_env

    rows = as_messages(CONVERSATIONS)
    rows[0]["messages"][1]["name"] = "alice"  # one message with an extra key: the others get name=null in Arrow
    data = write_jsonl(str(tmp_path / "chat.jsonl"), rows)
    hub = FakeHub.start()
    try:
        env = cli_env(**hub.env(), HF_DATASETS_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
        subprocess.run([sys.executable, "-c", HUB_UPLOAD, data], env=env, check=True, capture_output=True)
        run = str(tmp_path / "hub-run")
        out = run_cli(["prepare", "--data", "tester/mini-chat", "--tokenizer", chatml_tokenizer_dir,
                       "--chat-template", "chatml", "--run-dir", run], env=env)
        assert "conversations read" in out.stdout
    finally:
        hub.stop()
    _, local = run_prepare(tmp_path, data, chatml_tokenizer_dir, name="local", chat_template="chatml")
    assert cache_files(open_run(run)) == cache_files(local)
    assert open_run(run).prepare.format == "messages"


def test_every_file_source_reads_conversations_alike(tmp_path, gcs, chatml_tokenizer_dir):
    """.jsonl, .jsonl.gz, a .json list and a gs:// file: the same cache."""
    import gzip

    import gcsfs

    rows = as_sharegpt(CONVERSATIONS)
    jsonl = write_jsonl(str(tmp_path / "chat.jsonl"), rows)
    gz = tmp_path / "chat.jsonl.gz"
    gz.write_bytes(gzip.compress(open(jsonl, "rb").read()))
    js = tmp_path / "chat.json"
    js.write_text(json.dumps(rows, ensure_ascii=False))
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.put_file(jsonl, f"{gcs.bucket}/inputs/chat.jsonl")
    _, base = run_prepare(tmp_path, jsonl, chatml_tokenizer_dir, name="jsonl", chat_template="chatml")
    for name, data in (("gz", str(gz)), ("json", str(js)), ("gcs", f"{gcs.url}/inputs/chat.jsonl")):
        _, run = run_prepare(tmp_path, data, chatml_tokenizer_dir, name=name, chat_template="chatml")
        assert cache_files(run) == cache_files(base), name
        assert open_run(run.url).prepare.format == "sharegpt"
