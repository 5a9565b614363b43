"""Tokenizer loading and Stanford Alpaca's label rule.

Stanford's `preprocess` (tatsu-lab/stanford_alpaca, train.py) tokenizes the prompt and prompt+output+eos separately
(each truncated to model_max_length), takes the full text's ids as input_ids, and masks the first
len(tokenize(prompt)) labels with -100. `tokenize_examples` produces exactly those labels, stored as a 0/1 `targets`
array (1 where Stanford's label is not -100).

Speed: when the tokenizer is *prefix-stable* (see `prefix_stable`), the prompt's token count is read off the full
text's tokenization, so each text is tokenized once: from how many characters each token covers (`CharTable`, so the
Rust tokenizer need not compute offsets, a fifth of its time), else from the offsets. Where a token straddles the
prompt/response boundary (a ':' merging with a following '"', say), the prompt alone tokenizes differently: those
prompts, and every prompt of a tokenizer that is not prefix-stable, are tokenized on their own, as Stanford does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Sequence

import numpy as np

from alpaca_cli import io
from alpaca_cli.errors import ConfigError, DataError, first_line

logger = logging.getLogger(__name__)

# Stanford Alpaca's special-token defaults (train.py: DEFAULT_PAD_TOKEN ... DEFAULT_UNK_TOKEN).
DEFAULT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


@dataclass
class LoadedTokenizer:
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    added: dict[str, str]
    """Special tokens added because the tokenizer lacked them (Stanford adds [PAD] to Llama)."""
    local_dir: str
    """A local folder holding the tokenizer as prepared (with the added tokens)."""
    fingerprint: str
    """sha256 over the saved tokenizer files."""


def load_tokenizer(spec: str, *, add_missing_special_tokens: bool = True) -> LoadedTokenizer:
    """Load a tokenizer from a Hub id or a local/remote folder; add Stanford's missing special tokens; save it.

    The saved copy (in a temporary folder, `local_dir`) is what the run directory keeps, so later commands never
    need the Hub.
    """
    from transformers import AutoTokenizer

    def _load(path: str):
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            where = "folder" if os.path.isdir(path) else "Hub id"
            raise ConfigError(
                f"--tokenizer {spec}: cannot load a tokenizer from this {where} ({first_line(e) or type(e).__name__})",
                hint="pass a local tokenizer folder, or check the id, your network and HF_TOKEN for gated models",
            ) from None

    if io.is_remote(spec):
        if not io.exists(spec):
            raise ConfigError(f"--tokenizer {spec}: no such folder")
        with io.local_dir(spec) as local:
            tok = _load(local)
    else:
        path = os.path.expanduser(spec)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--tokenizer {spec}: expected a tokenizer folder, found a file")
        if not os.path.exists(path) and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise ConfigError(f"--tokenizer {spec}: no such folder")
        tok = _load(path if os.path.exists(path) else spec)

    added: dict[str, str] = {}
    if add_missing_special_tokens:
        for attr, default in DEFAULT_SPECIAL_TOKENS.items():
            if getattr(tok, attr, None) is None:
                added[attr] = default
        if added:
            tok.add_special_tokens(added)
            logger.debug("Added special tokens %s (vocabulary is now %d)", added, len(tok))

    local_dir = tempfile.mkdtemp(prefix="alpaca-tok-")
    tok.save_pretrained(local_dir)
    return LoadedTokenizer(tokenizer=tok, added=added, local_dir=local_dir, fingerprint=hash_folder(local_dir))


def hash_folder(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def special_tokens_after_text(tok) -> bool:
    """Whether the tokenizer's post-processor appends special tokens after the text (e.g. add_eos_token=True)."""
    for probe in ("a", "Hello world"):
        with_special = tok(probe)["input_ids"]
        plain = tok(probe, add_special_tokens=False)["input_ids"]
        if with_special[len(with_special) - len(plain) :] != plain:
            return True
    return False


def prefix_stable(tok) -> tuple[bool, str]:
    """Whether tokenize(prompt) is the prefix of tokenize(prompt + rest) that ends at the prompt's last character,
    whenever no token of the full text straddles that boundary.

    This holds for byte-pair encoding over one unsplit word (Llama/Mistral SentencePiece-BPE tokenizers): a merge
    across the boundary would leave a straddling token, so the left side's merges are the same with or without the
    right side. Pre-tokenizers with look-ahead (GPT-2's regex), normalizers that compose characters, word-final
    suffixes and unigram models give no such guarantee, and get the two-tokenization path.
    """
    import json

    backend = getattr(tok, "backend_tokenizer", None)
    if not getattr(tok, "is_fast", False) or backend is None:
        return False, "slow tokenizer (no offsets)"
    model = backend.model
    if type(model).__name__ != "BPE":
        return False, f"model type {type(model).__name__}"
    if model.dropout or getattr(model, "ignore_merges", False) or model.end_of_word_suffix:
        return False, "BPE options (dropout, ignore_merges or end_of_word_suffix)"
    if model.continuing_subword_prefix:
        return False, "BPE continuing_subword_prefix"
    if not (model.byte_fallback or model.unk_token):
        # characters outside the vocabulary are silently dropped, and the offsets after them were seen to drift
        return False, "BPE without byte fallback or unknown token"
    # components serialise on their own (cheap); the whole tokenizer's JSON would include the vocabulary
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    if pre is not None and not (pre.get("type") == "Metaspace" and pre.get("split") is False):
        return False, f"pre-tokenizer {pre.get('type')}"
    norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
    steps = [] if norm is None else (norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm])
    for step in steps:
        if step.get("type") not in ("Prepend", "Replace"):
            return False, f"normalizer {step.get('type')}"
        if step.get("type") == "Replace" and len((step.get("pattern") or {}).get("String", "xx")) != 1:
            return False, "multi-character Replace normalizer"
    if special_tokens_after_text(tok):
        return False, "special tokens added after the text"
    return True, "BPE over one unsplit word"


def encode_batch(tok, texts: list[str], *, add_special_tokens: bool, offsets: bool = True) -> list:
    """The Rust encodings of a fast tokenizer's texts, whole (no truncation or padding left set on the backend by
    an earlier call), special-token text read as the tokenizer reads it (split_special_tokens); offsets=False: ids
    only, without the offsets (encode_batch_fast, a fifth less time)."""
    b = tok.backend_tokenizer
    b.no_truncation()
    b.no_padding()
    split = bool(getattr(tok, "split_special_tokens", False))
    if b.encode_special_tokens != split:
        b.encode_special_tokens = split
    encode = b.encode_batch if offsets else b.encode_batch_fast
    return encode(texts, add_special_tokens=add_special_tokens)


class _Encoder:
    """Batch encoding straight through the Rust tokenizer when there is one (what PreTrainedTokenizerFast.__call__
    does, without building its Python dicts); anything else goes through the tokenizer's own __call__."""

    def __init__(self, tok):
        self.tok = tok
        self.backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        # With special tokens only in front, keeping the first max_length ids is exactly Hugging Face truncation.
        self.truncate_by_slicing = not special_tokens_after_text(tok)

    def __call__(self, texts: list[str], offsets: bool = False):
        """The ids of each text, and (with offsets=True, fast tokenizers only) the Rust encodings to ask about
        characters and tokens."""
        if self.backend is None:
            return self.tok(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"], None
        encodings = encode_batch(self.tok, texts, add_special_tokens=True, offsets=offsets)
        return [e.ids for e in encodings], (encodings if offsets else None)

    def truncate(self, ids: list[int], text: str, max_length: int) -> list[int]:
        if self.truncate_by_slicing:
            return ids[:max_length]
        return self.tok(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


@dataclass
class CharTable:
    """How many characters of the text each token id covers, for a prefix-stable tokenizer (BPE over one unsplit
    word: its tokens' pieces, spaces as '▁', concatenate to the text). A byte-fallback token <0xNN> covers the
    character its UTF-8 lead byte starts and nothing for a continuation byte (`inside`: it sorts just after the
    character's start); an added token covers its content. Every text is checked against it (the characters its
    tokens cover must add up to the text's), and any text that does not add up, or has an added token before the
    boundary, gets its prompt tokenized alone: the table can only send a prompt to the exact fallback, never give
    it a wrong length."""

    chars: np.ndarray
    inside: np.ndarray
    added: np.ndarray
    front: int
    """Tokens the post-processor puts before the text (a BOS)."""
    prepended: int
    """Characters the tokenizer puts before the text ('▁' of a Prepend normalizer or a Metaspace prepend_scheme)."""
    prepended_before_space: int
    """The same before a text that starts with a space or '▁' (Metaspace puts none there)."""

    def prompt_lengths(self, prompts: Sequence[str], texts: Sequence[str], ids: Sequence[list[int]]) -> list:
        """The token count of each prompt within its text (None where it must be tokenized alone): the index of
        the first token that starts where the prompt ends, found for the whole batch at once."""
        n = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), np.int64, int(n.sum()))
        if not len(flat):
            return [None] * len(ids)
        ends = np.cumsum(n)
        starts = ends - n
        first = np.minimum(starts + self.front, len(flat) - 1)
        c = self.chars[flat]
        before = np.cumsum(c) - c  # characters before each token, over the batch
        key = 2 * before - self.inside[flat]
        if np.any(key[1:] < key[:-1]):  # a continuation byte after a token of no characters: no order to search
            return [None] * len(ids)
        covered = before[ends - 1] + c[ends - 1] - before[first]
        text_chars = np.fromiter(map(len, texts), np.int64, len(texts))
        prompt_chars = np.fromiter(map(len, prompts), np.int64, len(prompts))
        spaced = np.fromiter((t[:1] in (" ", "▁") for t in texts), bool, len(texts))
        prepended = np.where(spaced, self.prepended_before_space, self.prepended)
        target = 2 * (before[first] + prepended + prompt_chars)
        k = np.searchsorted(key, target)
        kk = np.minimum(k, len(flat) - 1)
        added = self.added[flat]
        added_before = np.cumsum(added) - added
        # an empty prompt tokenizes to its special tokens alone, without the '▁' put in front of a text
        ok = ((n > self.front) & (prompt_chars > 0) & (covered == text_chars + prepended) & (k < ends)
              & (key[kk] == target) & (added_before[kk] == added_before[first]))
        return [int(x) if good else None for x, good in zip(k - starts, ok)]


_CHAR_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def char_table(tok) -> CharTable | None:
    """The tokenizer's CharTable (built once per tokenizer object and vocabulary size), or None where its pieces do
    not spell its text (not a fast BPE tokenizer, or a probe's characters do not add up)."""
    cached = _CHAR_TABLES.get(tok)
    if cached is not None and cached[0] == len(tok):
        return cached[1]
    table = None
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None and type(backend.model).__name__ == "BPE":
        vocab = backend.get_vocab(with_added_tokens=False)
        added_tokens = backend.get_added_tokens_decoder()
        size = max([*vocab.values(), *added_tokens.keys()]) + 1
        chars, inside, added = np.zeros(size, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int64)
        byte_fallback = bool(backend.model.byte_fallback)
        for piece, i in vocab.items():
            if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                continuation = 0x80 <= int(piece[3:5], 16) < 0xC0
                chars[i], inside[i] = (0, 1) if continuation else (1, 0)
            else:
                chars[i] = len(piece)
        for i, token in added_tokens.items():
            chars[i], inside[i], added[i] = len(token.content), 0, 1
        unk = backend.model.unk_token
        if unk is not None and backend.token_to_id(unk) is not None:
            added[backend.token_to_id(unk)] = 1  # it stands for characters it does not spell (fused, even)
        with_special, plain, spaced = (e.ids for e in [
            *encode_batch(tok, ["a b"], add_special_tokens=True, offsets=False),
            *encode_batch(tok, ["a b", " a b"], add_special_tokens=False, offsets=False)])
        front = len(with_special) - len(plain)
        prepended, before_space = int(chars[plain].sum()) - 3, int(chars[spaced].sum()) - 4
        if front >= 0 and with_special[front:] == plain and prepended in (0, 1) and before_space in (0, 1):
            table = CharTable(chars, inside, added, front, prepended, before_space)
    _CHAR_TABLES[tok] = (len(tok), table)
    return table


@dataclass
class Tokenized:
    """Examples as Stanford would build them, plus what happened to each source record."""

    input_ids: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    """1 where the label is a training target (Stanford's label != -100), 0 where it is masked."""
    source_index: list[int] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"too_long": 0, "no_trained_tokens": 0})
    dropped_examples: list[tuple[int, str]] = field(default_factory=list)
    prompts_tokenized_alone: int = 0


def tokenize_examples(
    tok,
    prompts: Sequence[str],
    outputs: Sequence[str],
    *,
    max_length: int,
    on_overflow: str = "truncate",
    mask_inputs: bool = True,
    batch_size: int = 2048,
    fast_path: bool | None = None,
    progress: Callable[[int], None] | None = None,
    source_offset: int = 0,
    into: Tokenized | None = None,
) -> Tokenized:
    """Tokenize prompt + output + eos for each record and compute Stanford's label mask.

    on_overflow: "truncate" keeps the first max_length tokens exactly as Hugging Face truncation does (the EOS can
    be lost, as in Stanford's run); "drop" leaves the record out; "error" raises DataError naming the record.
    Records with no trained token left (a prompt of max_length tokens or more) are dropped and counted.
    """
    if tok.eos_token is None:
        raise ConfigError("the tokenizer has no eos_token; Alpaca targets end with it")
    if fast_path is None:
        fast_path, _ = prefix_stable(tok)
    out = into if into is not None else Tokenized()
    encoder = _Encoder(tok)
    table = char_table(tok) if fast_path else None
    eos = tok.eos_token
    for start in range(0, len(prompts), batch_size):
        p_batch = prompts[start : start + batch_size]
        full = [p + o + eos for p, o in zip(p_batch, outputs[start : start + batch_size])]
        if table is not None:
            ids_batch, _ = encoder(full)
            known = table.prompt_lengths(p_batch, full, ids_batch)
        else:
            ids_batch, encodings = encoder(full, offsets=fast_path)
            known = _offset_prompt_lengths(p_batch, encodings) if fast_path else [None] * len(p_batch)
        prompt_len = _prompt_lengths(encoder, p_batch, known, out)
        for j, ids in enumerate(ids_batch):
            _add_example(out, encoder, ids, full[j], prompt_len[j], source_offset + start + j, max_length=max_length,
                         on_overflow=on_overflow, mask_inputs=mask_inputs)
        if progress is not None:
            progress(len(p_batch))
    return out


def _offset_prompt_lengths(prompts: Sequence[str], encodings) -> list:
    """The token count of each prompt within its full text, from the Rust encodings' offsets: the index of the token
    holding the first character after the prompt, when that token starts exactly there (None: it starts earlier and
    straddles the boundary). Asked of the Rust encoding: building Python offset lists costs more than this."""
    known: list[int | None] = []
    for p, enc in zip(prompts, encodings):
        boundary = len(p)
        t = enc.char_to_token(boundary)
        known.append(t if t is not None and enc.token_to_chars(t)[0] == boundary else None)
    return known


def _prompt_lengths(encoder: _Encoder, prompts: Sequence[str], known: list, out: Tokenized) -> list[int]:
    """Each prompt's token count: as known from the full text, else (None: a token straddles the boundary, or the
    tokenizer is not prefix-stable) from the prompt tokenized alone."""
    prompt_len = list(known)
    alone = [i for i, n in enumerate(prompt_len) if n is None]
    if alone:
        enc_p, _ = encoder([prompts[i] for i in alone])
        for i, ids in zip(alone, enc_p):
            prompt_len[i] = len(ids)
        out.prompts_tokenized_alone += len(alone)
    return prompt_len


def _add_example(out: Tokenized, encoder: _Encoder, ids: list[int], text: str, n_prompt: int, src: int, *,
                 max_length: int, on_overflow: str, mask_inputs: bool) -> None:
    """One record's ids (of `text`, the prompt its first n_prompt) into `out`: truncated, dropped or refused when too
    long, dropped when no token is left to train."""
    if len(ids) > max_length:
        if on_overflow == "error":
            raise DataError(
                f"record {src} is {len(ids)} tokens long, over --max-length {max_length}",
                hint="raise --max-length, or use --on-overflow truncate or drop",
            )
        if on_overflow == "drop":
            out.dropped["too_long"] += 1
            out.dropped_examples.append((src, "too_long"))
            return
        # Hugging Face truncation, as Stanford's tokenizer(..., truncation=True, max_length=512) does it.
        original = len(ids)
        ids = encoder.truncate(ids, text, max_length)
        n_prompt = min(n_prompt, max_length)
        out.truncated += 1
        out.truncated_tokens += original - len(ids)
    arr = np.asarray(ids, dtype=np.int32)
    targets = np.ones(len(arr), dtype=np.uint8)
    if mask_inputs:
        targets[:n_prompt] = 0
    # position 0 is never predicted, so only targets[1:] train anything
    if len(arr) - (max(n_prompt, 1) if mask_inputs else 1) <= 0:
        out.dropped["no_trained_tokens"] += 1
        out.dropped_examples.append((src, "no_trained_tokens"))
        return
    out.input_ids.append(arr)
    out.targets.append(targets)
    out.source_index.append(src)
    out.prompt_lengths.append(n_prompt)
