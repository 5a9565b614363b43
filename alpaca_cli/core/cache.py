"""The prepared token cache: Levanter's TreeStore format, one row per kept example.

Row fields:
  input_ids     int32[n]   prompt + output + eos, as the tokenizer produced them (truncated when asked)
  targets       uint8[n]   1 where the token is a training target (Stanford's label != -100), else 0
  source_index  int64[1]   position of the source record in the data
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alpaca_cli import seal
from alpaca_cli.errors import RunDirError

EXEMPLAR = {
    "input_ids": np.zeros((0,), dtype=np.int32),
    "targets": np.zeros((0,), dtype=np.uint8),
    "source_index": np.zeros((0,), dtype=np.int64),
}

IGNORE_INDEX = -100


def labels(input_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Hugging Face labels: the ids, with -100 wherever the token is not a training target."""
    return np.where(targets.astype(bool), input_ids, IGNORE_INDEX).astype(np.int64)


def identity(fingerprint: str) -> dict:
    """What a cache's seal records: the fingerprint of the inputs it was prepared from."""
    return {"fingerprint": fingerprint}


def problem(cache_dir: str, fingerprint: str) -> str | None:
    """None when the cache is whole and prepared from these inputs (its seal checked), else what is wrong."""
    return seal.problem(cache_dir, identity(fingerprint))


def seal_cache(cache_dir: str, fingerprint: str) -> None:
    """Seal a finished cache (after Levanter's writer closed it with its ledger): its files, sizes and fingerprint."""
    seal.write(cache_dir, identity(fingerprint))


@dataclass
class PreparedCache:
    """Read access to a finished cache (no Ray)."""

    store: object  # levanter.store.tree_store.TreeStore

    def __len__(self) -> int:
        return len(self.store)

    def rows(self, indices) -> list[dict[str, np.ndarray]]:
        return self.store.get_batch_sync(list(indices))

    @property
    def input_ids(self):
        return self.store.tree["input_ids"]

    @property
    def targets(self):
        return self.store.tree["targets"]

    def lengths(self) -> np.ndarray:
        """Token count of every example, from the offsets alone."""
        store = self.input_ids
        n = len(self)
        offsets = store.offsets[0 : n + 1].read().result().copy()
        offsets[0] = 0  # Levanter keeps the row count in offsets[0]
        return np.diff(offsets)

    def trained_tokens(self) -> np.ndarray:
        """Tokens each example trains on: targets[1:].sum() (position 0 is never predicted)."""
        lengths = self.lengths()
        flat = self.targets.data[0 : int(lengths.sum())].read().result()
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        totals = np.add.reduceat(flat.astype(np.int64), starts) if len(lengths) else np.zeros(0, np.int64)
        first = flat[starts].astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
        return totals - first

    def source_indices(self) -> np.ndarray:
        n = len(self)
        return self.store.tree["source_index"].data[0:n].read().result().astype(np.int64)


def open_cache(cache_dir: str, fingerprint: str | None = None, *, rebuild: str = "run `alpaca prepare` again"
               ) -> PreparedCache:
    """A finished cache, refused unless whole (and, given a fingerprint, prepared from those inputs)."""
    from levanter.store.tree_store import TreeStore

    why = seal.problem(cache_dir, identity(fingerprint) if fingerprint else {})
    if why is not None:
        raise RunDirError(f"the token cache at {cache_dir} {why}", hint=f"{rebuild}: it rebuilds the cache")
    store = TreeStore.open(EXEMPLAR, cache_dir, mode="r", cache_metadata=True)
    return PreparedCache(store=store)


def open_run_cache(run) -> PreparedCache:
    """The run's prepared cache (RunDir run), refused unless whole and the one its prepare record describes."""
    return open_cache(run.cache_dir, run.require_prepare().fingerprint,
                      rebuild=f"run `alpaca prepare --run-dir {run.url}` again with the same inputs")
