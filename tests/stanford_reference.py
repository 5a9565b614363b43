"""An independent re-implementation of Stanford Alpaca's data preprocessing, for comparison in tests.

Follows tatsu-lab/stanford_alpaca train.py (`_tokenize_fn`, `preprocess`, `SupervisedDataset`) line by line, with
lists instead of torch tensors: each source and each example is tokenized on its own with
`tokenizer(text, padding="longest", max_length=model_max_length, truncation=True)`; the label is the example's
input ids with the first len(source) ids replaced by -100, where len counts the non-pad ids (as Stanford's
`.ne(tokenizer.pad_token_id).sum()` does).
"""

from __future__ import annotations

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"

PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def stanford_tokenizer(path, *, use_fast=False, model_max_length=512, **kwargs):
    """The tokenizer as Stanford's train.py loads it: transformers directly, slow (sentencepiece) by default,
    right padding, and the special tokens it lacks added (`smart_tokenizer_and_embedding_resize`'s dict)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, model_max_length=model_max_length, padding_side="right", use_fast=use_fast, **kwargs
    )
    special_tokens_dict = dict()
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = DEFAULT_UNK_TOKEN
    tokenizer.add_special_tokens(special_tokens_dict)
    return tokenizer


def _tokenize_fn(strings, tokenizer, model_max_length):
    tokenized_list = [
        tokenizer(text, padding="longest", max_length=model_max_length, truncation=True) for text in strings
    ]
    input_ids = [t["input_ids"] for t in tokenized_list]
    input_ids_lens = [sum(1 for i in ids if i != tokenizer.pad_token_id) for ids in input_ids]
    return input_ids, input_ids_lens


def preprocess(records, tokenizer, model_max_length=512, prompt_dict=PROMPT_DICT):
    """(input_ids, labels) for each record, as Stanford's SupervisedDataset builds them."""
    prompt_input, prompt_no_input = prompt_dict["prompt_input"], prompt_dict["prompt_no_input"]
    sources = [
        prompt_input.format_map(example) if example.get("input", "") != "" else prompt_no_input.format_map(example)
        for example in records
    ]
    targets = [f"{example['output']}{tokenizer.eos_token}" for example in records]
    examples = [s + t for s, t in zip(sources, targets)]
    examples_ids, _ = _tokenize_fn(examples, tokenizer, model_max_length)
    _, sources_lens = _tokenize_fn(sources, tokenizer, model_max_length)
    labels = []
    for ids, source_len in zip(examples_ids, sources_lens):
        label = list(ids)
        label[:source_len] = [IGNORE_INDEX] * min(source_len, len(label))
        labels.append(label)
    return examples_ids, labels
