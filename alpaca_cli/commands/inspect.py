"""`alpaca inspect`: prepared examples (Alpaca records or conversations) as the model sees them, trained tokens set
apart from masked ones."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from alpaca_cli.options import RunDirOpt

EXAMPLES = """\b
Examples:
  alpaca inspect --run-dir runs/x                       the first 3 examples, trained tokens in green
  alpaca inspect --run-dir runs/x --index 17 --count 2  from source record 17
  alpaca inspect --run-dir runs/x --json > labels.jsonl one {"index", "input_ids", "labels"} per example
  alpaca inspect --run-dir runs/mix --source chat -i 4  a mixture: record 4 of its source `chat`
"""


def inspect(
    run_dir: RunDirOpt = None,
    index: Annotated[
        Optional[int],
        typer.Option("--index", "-i", help="Start at source record N (the `index` in --json).", min=0, show_default=False),
    ] = None,
    count: Annotated[
        Optional[int],
        typer.Option(
            "--count", "-n", help="How many examples. Default: 3, or all with --json.", min=1, show_default=False
        ),
    ] = None,
    json_: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per line: index (source record), input_ids, labels (-100 where not trained); "
            "source (its name) for a mixture.",
        ),
    ] = False,
    source: Annotated[
        Optional[str],
        typer.Option("--source", "-s", help="A mixture's source (by name): show its examples, --index counting its "
                     "records. Default: every example; --index counts the first source's records.",
                     show_default=False),
    ] = None,
) -> None:
    """Show prepared examples with trained tokens set apart (or as JSON labels)."""
    from alpaca_cli import console, rundir
    from alpaca_cli.core import cache as cachemod

    run = rundir.open_run(run_dir)
    record = run.require_prepare()
    prepared = cachemod.open_run_cache(run)
    all_sources = record.source_list()
    first, stop = source_range(all_sources, source, index is not None, len(prepared))
    sources = prepared.source_indices()[first:stop]
    if index is not None and len(sources) and index > sources[-1]:
        from alpaca_cli.errors import ConfigError

        raise ConfigError(f"--index {index} is past the end: the prepared examples are source records "
                          f"{sources[0]} to {sources[-1]} ({len(sources)} examples)",
                          hint="give an --index in that range")
    start = 0 if index is None else int(sources.searchsorted(index))
    if index is not None and (start >= len(sources) or sources[start] != index):
        shown = f"; the next prepared one is record {sources[start]}" if start < len(sources) else ""
        console.stderr.print(f"record {index} is not in the prepared data (dropped or out of range){shown}")
    n = count if count is not None else (len(sources) - start if json_ else 3)
    positions = range(first + start, first + min(len(sources), start + n))
    mixture = len(all_sources) > 1

    def source_of(position: int):
        s = next(i for i, x in enumerate(all_sources) if x.rows[0] <= position < x.rows[1])
        return s, all_sources[s]

    if json_:
        write_json(prepared, positions, lambda position: source_of(position)[1].name if mixture else None)
        return

    tok = run.load_tokenizer()
    for position, row in zip(positions, prepared.rows(positions)):
        s, src = source_of(position)
        label = f" of {src.name} (source {s + 1}/{len(all_sources)})" if mixture else ""
        console.stdout.print(render_example(tok, row, conversation=src.format != "alpaca", label=label))


def write_json(prepared, positions: range, source_name) -> None:
    """The --json lines: index, input_ids, labels, and `source` where source_name(position) names one."""
    import json
    import sys

    from alpaca_cli.core import cache as cachemod

    for chunk_start in range(positions.start, positions.stop, 1024):
        chunk = range(chunk_start, min(positions.stop, chunk_start + 1024))
        for position, row in zip(chunk, prepared.rows(chunk)):
            ids = row["input_ids"]
            obj = {
                "index": int(row["source_index"][0]),
                "input_ids": ids.tolist(),
                "labels": cachemod.labels(ids, row["targets"]).tolist(),
            }
            name = source_name(position)
            if name is not None:
                obj["source"] = name
            sys.stdout.write(json.dumps(obj) + "\n")


def source_range(sources, name: str | None, by_index: bool, rows: int) -> tuple[int, int]:
    """The cache rows [start, stop) inspect shows: the named source's, the first source's when an --index is to be
    found (source record numbers restart in each source of a mixture), else every row."""
    if name is not None:
        named = [s for s in sources if s.name == name]
        if not named:
            from alpaca_cli.errors import ConfigError

            raise ConfigError(f"--source {name}: the run has no such source",
                              hint="one of " + ", ".join(s.name for s in sources))
        return named[0].rows[0], named[0].rows[1]
    if by_index and len(sources) > 1:
        return sources[0].rows[0], sources[0].rows[1]
    return 0, rows


def render_example(tok, row, *, conversation: bool = False, label: str = "") -> "object":
    """Rich Text: masked tokens dim, trained tokens bold green, token boundaries kept exact (decoded per run). A
    conversation (rendered by its chat template, role headers and all) says how many trained spans (assistant
    turns) it holds."""
    import numpy as np
    from rich.text import Text

    ids, targets = row["input_ids"], row["targets"].astype(bool)
    trained = int(targets[1:].sum())
    text = Text()
    if conversation:
        spans = int(targets[0]) + int(np.count_nonzero(targets[1:] & ~targets[:-1]))
        what = f"conversation {int(row['source_index'][0])}{label}: {len(ids)} tokens, {trained} trained in " \
               f"{spans} assistant span{'s' if spans != 1 else ''}"
    else:
        what = f"record {int(row['source_index'][0])}{label}: {len(ids)} tokens, {trained} trained"
    text.append(f"── {what} (dim = masked, green = trained) ──\n", style="bold")
    # decode runs of equal mask value; decoding the prefix up to each boundary keeps SentencePiece spaces exact
    edges = [0] + [i for i in range(1, len(ids)) if targets[i] != targets[i - 1]] + [len(ids)]
    decoded_prefix = ""
    for a, b in zip(edges[:-1], edges[1:]):
        full = tok.decode(ids[:b].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = full[len(decoded_prefix) :] if full.startswith(decoded_prefix) else tok.decode(ids[a:b].tolist())
        decoded_prefix = full
        text.append(piece, style="bold green" if targets[a] else "dim")
    text.append("\n")
    return text
