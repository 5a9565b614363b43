"""The tokenizers of the families differ where the labels care: BOS added or not, pad missing or equal to EOS (Qwen's
base models), EOS spelled `</s>`, `<|endoftext|>`, `<|end_of_text|>` or `<eos>`. For a tokenizer of each kind (built
offline), prepared labels equal Stanford's recipe and every example that was not truncated trains on its EOS."""

from __future__ import annotations

import pytest
from helpers import prepared_examples, read_records, stanford_examples
from stanford_reference import PROMPT_DICT, stanford_tokenizer

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core.prepare import prepare
from alpaca_cli.rundir import open_run


def _train_bpe(texts, *, byte_level: bool, specials: list[str], bos: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style (Gemma): spaces as ▁, no pre-splitting
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        alphabet = sorted({c for t in texts for c in t.replace(" ", "▁")})
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                       initial_alphabet=alphabet))
    if bos is not None:  # the BOS is added by the post-processor, as Llama-3's and Gemma's tokenizers do
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


KINDS = {
    # Qwen2.5 base: byte-level BPE, no BOS, pad == eos == <|endoftext|>
    "pad-is-eos": dict(byte_level=True, specials=["<|endoftext|>"], bos=None,
                       names=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")),
    # Llama-3: byte-level BPE, <|begin_of_text|> added in front, EOS <|end_of_text|>, no pad ([PAD] is added)
    "llama3": dict(byte_level=True, specials=["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>",
                   names=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")),
    # Gemma: SentencePiece-style BPE, <bos> added, EOS <eos>, its own <pad>
    "gemma": dict(byte_level=False, specials=["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>",
                  names=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_labels_equal_stanford_and_eos_is_trained(kind, tmp_path, fixture_data):
    from transformers import PreTrainedTokenizerFast

    spec = KINDS[kind]
    records = read_records(fixture_data)
    texts = [PROMPT_DICT["prompt_input"].format_map({"input": "", **r}) + r["output"] for r in records] * 5
    backend = _train_bpe(texts, byte_level=spec["byte_level"], specials=spec["specials"], bos=spec["bos"])
    folder = str(tmp_path / kind)
    PreTrainedTokenizerFast(tokenizer_object=backend, **spec["names"]).save_pretrained(folder)

    result = prepare(PrepareConfig(data=fixture_data, tokenizer=folder, max_length=256),
                     open_run(str(tmp_path / "run"), create=True))
    tok = stanford_tokenizer(folder, use_fast=True)
    got = prepared_examples(str(tmp_path / "run"))
    assert got == stanford_examples(records, tok, max_length=256)

    eos = tok.eos_token_id
    added = result.stats["added_tokens"]
    # Stanford's recipe adds the special tokens a tokenizer lacks ([PAD], and <s>/<unk> where missing), and no
    # [PAD] where the pad token is the EOS
    assert added == {"pad-is-eos": {"bos_token": "<s>", "unk_token": "<unk>"},
                     "llama3": {"pad_token": "[PAD]", "unk_token": "<unk>"}, "gemma": {}}[kind]
    if kind == "pad-is-eos":
        assert tok.pad_token_id == eos
    bos = tok.bos_token_id if spec["bos"] else None
    for i, (ids, labels) in got.items():
        if bos is not None:
            assert ids[0] == bos and labels[0] == -100  # BOS in front, never a target
        if len(ids) < 256:  # not truncated: ends with EOS, and the EOS is trained
            assert ids[-1] == eos and labels[-1] == eos, (kind, i)
            assert ids.count(eos) == 1 or tok.pad_token_id == eos and ids[:-1].count(eos) == 0
