"""Tasks: records from a file on disk, turned into (prompt, target) text pairs.

Any JSON, JSONL, CSV or parquet file that Hugging Face ``datasets`` reads from disk works
(compressed too, e.g. ``.jsonl.gz``). ``data.prompt_template`` and ``data.response_template``
are Python format strings over a record's fields. The held-out split comes from a split field
(the shipped WordNet file has one) or from a seeded random fraction.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import DataConfig
from fedpeft.errors import DataError
from fedpeft.seeding import np_rng

__all__ = ["Task", "TextPair", "format_pairs", "load_task", "split_records"]

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextPair:
    """One example as text: what the model sees and what it should produce."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Task:
    """A task's records, split into training and held-out parts."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    @property
    def fields(self) -> list[str]:
        """Field names of the records."""
        return sorted(self.train[0]) if self.train else []


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {str(path)!r}: use a .json, .jsonl, .csv or .parquet file "
            "(optionally compressed, e.g. .jsonl.gz)"
        )
    return fmt


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; set data.path to a file")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(_format_of(path), data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"could not read {str(path)!r} with `datasets`: {err}") from err
    records: list[dict[str, Any]] = ds.to_list()
    if not records:
        raise DataError(f"data file {str(path)!r} has no records")
    return records


def load_task(cfg: DataConfig, seed: int) -> Task:
    """Read the data file and split it into training and held-out records.

    Raises
    ------
    DataError
        If the file is missing or unreadable, a split is empty, or the split field is absent.
    """
    return split_records(_read_records(Path(cfg.path)), cfg, seed, cfg.path)


def split_records(
    records: list[dict[str, Any]], cfg: DataConfig, seed: int, where: str = "the records"
) -> Task:
    """Split records into training and held-out ones as ``cfg`` says (see :func:`load_task`).

    Raises
    ------
    DataError
        If a split is empty or the split field is absent.
    """
    if not records:
        raise DataError(f"{where}: no records")
    if cfg.split_field:
        if cfg.split_field not in records[0]:
            raise DataError(
                f"data.split_field {cfg.split_field!r} is not a field of {where}; fields: "
                f"{sorted(records[0])}. Set data.split_field='' to hold out a random fraction"
            )
        train = [r for r in records if r[cfg.split_field] == cfg.train_split]
        held = [r for r in records if r[cfg.split_field] == cfg.eval_split]
    else:
        order = np_rng(seed, "eval-split").permutation(len(records))
        n_eval = max(1, round(cfg.eval_fraction * len(records)))
        held = [records[i] for i in sorted(order[:n_eval])]
        train = [records[i] for i in sorted(order[n_eval:])]
    if not train or not held:
        raise DataError(
            f"{where}: split gives {len(train)} training and {len(held)} held-out records; "
            "both must be non-empty"
        )
    return Task(train=train, eval=held)


def template_fields(template: str) -> set[str]:
    """The record fields a ``str.format`` template names."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def format_pairs(records: Sequence[dict[str, Any]], cfg: DataConfig) -> list[TextPair]:
    """Apply the prompt and response templates to every record.

    Raises
    ------
    DataError
        If a template names a field the records do not have.
    """
    if not records:
        return []
    needed = template_fields(cfg.prompt_template) | template_fields(cfg.response_template)
    missing = sorted(needed - set(records[0]))
    if missing:
        raise DataError(
            f"data templates use fields {missing} that {cfg.path!r} lacks; "
            f"fields: {sorted(records[0])}"
        )
    return [
        TextPair(prompt=cfg.prompt_template.format(**r), target=cfg.response_template.format(**r))
        for r in records
    ]
