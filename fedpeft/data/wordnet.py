"""Build the shipped WordNet definition task from the WordNet 3.0 database files.

Source: Debian's ``wordnet-base`` package (``/usr/share/wordnet/data.{noun,verb,adj,adv}``),
WordNet 3.0, Princeton University; its license allows redistribution with the notice kept
beside the data (``simulations/data/LICENSE.wordnet``).

Each synset becomes one record::

    {"id": "n03471473", "prompt": "Define the noun 'harbor'.", "response": "a sheltered port
     where ships can take on or discharge cargo", "domain": "noun.location", "split": "train"}

``domain`` is the synset's lexicographer file (45 of them: noun.animal, verb.motion, ...),
the natural non-IID key. About 2 % of synsets, chosen by a hash of the id, form the held-out
``eval`` split. Regenerate with::

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn
    fedpeft data wordnet --src wn/usr/share/wordnet --out simulations/data/wordnet.jsonl.gz
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpeft.errors import DataError

__all__ = ["LEXNAMES", "build_wordnet", "parse_data_line"]

# lexnames(5WN): lexicographer file number -> name (WordNet 3.0 documentation).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
_POS_WORD = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective syntactic markers, e.g. "galore(ip)"
EVAL_PERCENT = 2


def _definition(gloss: str) -> str:
    """The definition part of a gloss, without its quoted usage examples."""
    text = gloss.split('"', 1)[0].strip()
    return text.rstrip(";").strip()


def parse_data_line(line: str) -> dict[str, Any] | None:
    """Parse one line of a WordNet ``data.*`` file into a record (None for header lines).

    Raises
    ------
    DataError
        If the line is not in the WordNet data-file format.
    """
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        offset, lexfile, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
        lemma = fields[4]
    except (IndexError, ValueError):
        raise DataError(f"not a WordNet data line: {line[:80]!r}") from None
    if not sep or ss_type not in _POS_WORD or lexfile >= len(LEXNAMES) or w_cnt < 1:
        raise DataError(f"not a WordNet data line: {line[:80]!r}")
    definition = _definition(gloss)
    if not definition:
        return None
    word = _MARKER.sub("", lemma).replace("_", " ")
    sid = f"{ss_type if ss_type != 's' else 'a'}{offset}"
    bucket = int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=2).digest(), "little") % 100
    return {
        "id": sid,
        "prompt": f"Define the {_POS_WORD[ss_type]} '{word}'.",
        "response": definition,
        "domain": LEXNAMES[lexfile],
        "split": "eval" if bucket < EVAL_PERCENT else "train",
    }


def _records(src: Path) -> Iterator[dict[str, Any]]:
    for pos in ("noun", "verb", "adj", "adv"):
        path = src / f"data.{pos}"
        if not path.is_file():
            raise DataError(f"{str(path)!r} not found; --src must be WordNet's dict folder")
        with path.open(encoding="latin-1") as fh:
            for line in fh:
                rec = parse_data_line(line)
                if rec is not None:
                    yield rec


def build_wordnet(src: str | Path, out: str | Path) -> int:
    """Convert WordNet's data files into a gzipped JSONL task file (byte-reproducible).

    Returns
    -------
    int
        Number of records written.
    """
    buf = io.StringIO()
    n = 0
    for rec in _records(Path(src)):
        buf.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        n += 1
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue().encode("utf-8"))
    return n
