"""Tasks from files, templates, the WordNet converter, tokenization and batching."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.config import DataConfig
from fedpeft.data.clients import eval_assignment, partition_indices
from fedpeft.data.tasks import TextPair, format_pairs, load_task
from fedpeft.data.tokenize import IGNORE, collate, collate_prompts, encode_pairs
from fedpeft.data.wordnet import LEXNAMES, build_wordnet, parse_data_line
from fedpeft.errors import DataError

NOUN = (
    "03471473 06 n 02 harbor 0 harbour 0 002 @ 03135152 n 0000 ~ 03471902 n 0000 | a sheltered "
    'port where ships can take on or discharge cargo; "the ship entered the harbor"  \n'
)
ADJ = (
    "00001740 00 a 01 able(p) 0 005 ! 00002098 a 0101 | "
    "(usually followed by `to') having the necessary means  \n"
)


def test_wordnet_line_becomes_a_definition_record():
    rec = parse_data_line(NOUN)
    assert rec is not None
    assert rec["prompt"] == "Define the noun 'harbor'."
    assert rec["response"] == "a sheltered port where ships can take on or discharge cargo"
    assert rec["domain"] == "noun.artifact"
    assert rec["split"] in ("train", "eval")
    adj = parse_data_line(ADJ)
    assert (
        adj is not None
        and adj["prompt"] == "Define the adjective 'able'."
        and adj["domain"] == "adj.all"
    )


def test_wordnet_header_and_garbage_lines():
    assert parse_data_line("  1 This software and database is being provided\n") is None
    with pytest.raises(DataError):
        parse_data_line("not a data line at all\n")
    assert len(LEXNAMES) == 45


def test_build_wordnet_is_reproducible(tmp_path):
    src = tmp_path / "dict"
    src.mkdir()
    for pos in ("noun", "verb", "adj", "adv"):
        (src / f"data.{pos}").write_text("  1 header\n" + (NOUN if pos == "noun" else ""))
    out1, out2 = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert build_wordnet(src, out1) == 1
    build_wordnet(src, out2)
    assert out1.read_bytes() == out2.read_bytes()
    assert json.loads(gzip.decompress(out1.read_bytes()))["domain"] == "noun.artifact"


def test_shipped_wordnet_file(repo):
    path = repo / "simulations" / "data" / "wordnet.jsonl.gz"
    assert path.stat().st_size < 5_000_000
    assert (repo / "simulations" / "data" / "LICENSE.wordnet").read_text().count("Princeton") >= 2
    task = load_task(DataConfig(path=str(path)), seed=0)
    assert len(task.train) > 100_000 and 1_000 < len(task.eval) < 5_000
    assert len({r["domain"] for r in task.train}) == 45


def _write(tmp_path: Path, fmt: str) -> Path:
    rows = [{"q": f"question {i}", "a": f"answer {i}", "label": i % 3} for i in range(40)]
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        p.write_text("q,a,label\n" + "\n".join(f"{r['q']},{r['a']},{r['label']}" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_user_files_with_templates(tmp_path, fmt):
    cfg = DataConfig(
        path=str(_write(tmp_path, fmt)),
        prompt_template="Q: {q}\nA:",
        response_template=" {a}",
        split_field="",
        eval_fraction=0.25,
    )
    task = load_task(cfg, seed=3)
    assert len(task.train) == 30 and len(task.eval) == 10
    pairs = format_pairs(task.train, cfg)
    assert pairs[0].prompt.startswith("Q: question ") and pairs[0].target.startswith(" answer ")
    assert load_task(cfg, seed=3).eval == task.eval


def test_missing_template_field_names_available_fields(tmp_path):
    cfg = DataConfig(
        path=str(_write(tmp_path, "jsonl")),
        prompt_template="{question}",
        response_template="{a}",
        split_field="",
    )
    task = load_task(cfg, seed=0)
    with pytest.raises(DataError, match=r"\['question'\].*fields: \['a', 'label', 'q'\]"):
        format_pairs(task.train, cfg)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(DataConfig(path=str(tmp_path / "none.jsonl")), seed=0)
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_task(DataConfig(path=str(bad)), seed=0)


def test_tokenization_masks_prompt_and_teaches_stop(tiny_handle):
    tok = tiny_handle.tokenizer
    ex = encode_pairs(tok, [TextPair("abc\n", "xyz")], max_len=32)[0]
    assert ex.prompt_len == 4 and len(ex.input_ids) == 4 + 3 + 1
    assert ex.input_ids[-1] == tok.eos_token_id
    batch = collate(
        [ex, encode_pairs(tok, [TextPair("a\n", "b")], 32)[0]],
        tok.pad_token_id,
        torch.device("cpu"),
    )
    assert batch["input_ids"].shape == (2, 8)
    assert (batch["labels"][0, :4] == IGNORE).all() and (batch["labels"][0, 4:] != IGNORE).all()
    assert (batch["labels"][1, 4:] == IGNORE).all() and batch["attention_mask"][1].tolist() == [
        1
    ] * 4 + [0] * 4


def test_truncated_target_gets_no_eos(tiny_handle):
    tok = tiny_handle.tokenizer
    ex = encode_pairs(tok, [TextPair("p\n", "a long target text")], max_len=8)[0]
    assert len(ex.input_ids) == 8 and tok.eos_token_id not in ex.input_ids
    long_prompt = encode_pairs(tok, [TextPair("x" * 50, "t")], max_len=8)[0]
    assert len(long_prompt.input_ids) <= 8


def test_generation_batches_are_left_padded():
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_client_cap_and_natural_split_on_wordnet(tiny_config):
    cfg = tiny_config("federation.num_clients=4", "data.max_examples_per_client=50")
    task = load_task(cfg.data, cfg.federation.seed)
    parts = partition_indices(task, cfg.federation, cfg.data)
    assert [len(p) for p in parts] == [50] * 4
    domains = [{task.train[i]["domain"] for i in p} for p in parts]
    assert all(not (a & b) for i, a in enumerate(domains) for b in domains[i + 1 :])


def test_eval_records_follow_each_clients_training_keys():
    train_keys = ["a", "a", "b", "c", "c", "d"]
    parts = [[0, 1, 2], [3, 4, 5]]  # client 0 owns a, b; client 1 owns c, d
    eval_keys = ["a", "d", "b", "c", "zz"]
    out = eval_assignment(train_keys, parts, eval_keys, np.random.default_rng(0))
    assert sorted(i for p in out for i in p) == list(range(5))
    assert {0, 2} <= set(out[0]) and {1, 3} <= set(out[1])
