"""Build the demo tokenizer shipped in alpaca_cli/assets/demo_tokenizer (run once; its output is committed).

A Llama-2-style SentencePiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2, no pad token) trained on the demo
data and the Alpaca templates, converted to a Hugging Face fast tokenizer exactly as Llama 2's is
(LlamaTokenizerFast(vocab_file=..., legacy=False)). Needs sentencepiece (a dependency) and protobuf.
"""

import io
import json
import os
import sys
import tempfile

import sentencepiece as spm
from transformers import LlamaTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alpaca_cli.config import STANFORD_PROMPT_INPUT, STANFORD_PROMPT_NO_INPUT  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(ROOT, "alpaca_cli", "assets", "demo_tokenizer")
VOCAB = int(os.environ.get("VOCAB", "640"))


def corpus() -> list[str]:
    lines = []
    with open(os.path.join(ROOT, "alpaca_cli", "assets", "demo_data.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            template = STANFORD_PROMPT_INPUT if r["input"] else STANFORD_PROMPT_NO_INPUT
            lines.append(template.format_map(r) + r["output"])
    return lines * 4


def main() -> None:
    text = "\n".join(corpus())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(model.getvalue())
        tok = LlamaTokenizerFast(vocab_file=path, legacy=False)
        os.makedirs(OUT, exist_ok=True)
        tok.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(tok)} tokens)")


if __name__ == "__main__":
    main()
