"""Held-out / train n-gram overlap: hashes, the pooled and per-document shares, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cir.cli.main import app
from cir.data.overlap import _batch_hashes, _distinct, document_shares, ngram_hashes, split_overlap
from cir.data.shards import build_dataset, open_dataset
from cir.data.split import split_of
from typer.testing import CliRunner


def test_ngram_hashes_match_per_chunk_and_tell_ngrams_apart():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(6, 20))
    lengths = np.array([20, 17, 5, 4, 0, 12])
    h, valid = _batch_hashes(ids, lengths, 5)
    for k in range(6):
        np.testing.assert_array_equal(h[k][valid[k]], ngram_hashes(ids[k, : lengths[k]], 5))
    assert valid.sum(1).tolist() == [16, 13, 1, 0, 0, 8]
    seq = rng.integers(0, 4, size=400)  # small alphabet: many repeated 6-grams
    grams = {tuple(seq[i : i + 6]) for i in range(395)}
    assert len(np.unique(ngram_hashes(seq, 6))) == len(grams)
    assert len(ngram_hashes(seq[:3], 6)) == 0
    with pytest.raises(ValueError):
        ngram_hashes(seq, 0)
    x = ngram_hashes(seq, 3)
    np.testing.assert_array_equal(_distinct(x), np.unique(x))
    assert len(_distinct(x[:0])) == 0


def _reference(held, ref, n):
    """Per held-out chunk: (n-grams, how many occur anywhere in ``ref``), with Python sets."""
    seen = {tuple(ref.ids[i, j : j + n]) for i in range(len(ref))
            for j in range(ref.lengths[i] - n + 1)}
    return [(max(held.lengths[i] - n + 1, 0),
             sum(tuple(held.ids[i, j : j + n]) in seen for j in range(held.lengths[i] - n + 1)))
            for i in range(len(held))]


def test_split_overlap_matches_python_sets(tiny_dataset):
    held, ref = open_dataset(tiny_dataset, "test"), open_dataset(tiny_dataset, "train")
    for n in (2, 6):
        got = split_overlap(held, ref, n=n, top=100)
        want = np.array(_reference(held, ref, n))
        assert (got["ngrams"], got["found"]) == tuple(want.sum(0))
        assert 0 < got["found"] < got["ngrams"]  # some shared idioms, not everything
        index = held.documents()
        doc = index.of_chunks(np.arange(len(held)))
        shares = {index.ids[d]: want[doc == d, 1].sum() / want[doc == d, 0].sum()
                  for d in range(len(index)) if want[doc == d, 0].sum()}
        docs = got["documents"]
        assert docs["with_ngrams"] == len(shares) and len(docs["top"]) == len(shares)
        assert {d["id"]: d["share"] for d in docs["top"]} == pytest.approx(shares)
        assert docs["mean_share"] == pytest.approx(np.mean(list(shares.values())))
        listed = [d["share"] for d in docs["top"]]
        assert listed == sorted(listed, reverse=True)
        assert docs["over"]["0.5"] == sum(s >= 0.5 for s in shares.values())
        per_doc = document_shares(held, ref, n=n)  # every document, in index order
        assert per_doc.shape == (len(index),)
        assert {index.ids[d]: per_doc[d] for d in range(len(index)) if index.ids[d] in shares} == pytest.approx(shares)
        assert all(per_doc[d] == 0 for d in range(len(index)) if index.ids[d] not in shares)


def _name_in(split: str, stem: str) -> str:
    k = 0
    while split_of(f"file:{stem}{k}.py") != split:
        k += 1
    return f"{stem}{k}.py"


def test_a_copied_document_is_found(tiny_tokenizer, tmp_path):
    """A held-out file that copies a training file is listed first, near 100% seen; a file
    of its own is not."""
    src = tmp_path / "src"
    src.mkdir()
    body = "".join(f"def handler_{i}(request, limit={i}):\n    return request.items[:limit]\n"
                   for i in range(40))
    (src / _name_in("train", "original")).write_text(body)
    (src / _name_in("test", "vendored")).write_text(body + "# vendored copy\n")
    (src / _name_in("test", "own")).write_text(
        "".join(f"class Shape{i}:\n    sides = {i * 7 % 13}\n" for i in range(60)))
    build_dataset(tmp_path / "ds", str(src), tokenizer=tiny_tokenizer, seq_len=64)
    res = split_overlap(open_dataset(tmp_path / "ds", "test"), open_dataset(tmp_path / "ds", "train"),
                        n=8)
    top = res["documents"]["top"]
    assert top[0]["id"].startswith("file:vendored") and top[0]["share"] > 0.9
    assert top[1]["id"].startswith("file:own") and top[1]["share"] < 0.2
    assert res["documents"]["over"] == {"0.5": 1, "0.9": 1}


def test_cli_overlap(tiny_dataset, tiny_corpus, tiny_tokenizer, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "overlap", str(tiny_dataset), "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["split"], out["against"], out["n"]) == ("test", "train", 4)
    assert out["documents"]["count"] == len(open_dataset(tiny_dataset, "test").documents())
    rich = runner.invoke(app, ["data", "overlap", str(tiny_dataset), "--split", "val", "-n", "4"],
                         env={"COLUMNS": "200"})
    assert rich.exit_code == 0 and "of them in train" in rich.stdout and "most-seen val" in rich.stdout
    same = runner.invoke(app, ["data", "overlap", str(tiny_dataset), "--split", "train"])
    assert same.exit_code != 0 and "both 'train'" in same.output
    build_dataset(tmp_path / "packed", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer,
                  seq_len=64, pack=True)
    packed = runner.invoke(app, ["data", "overlap", str(tmp_path / "packed")])
    assert packed.exit_code == 0 and "no document index" in packed.stdout


def test_also_counts_a_second_training_corpus(tiny_tokenizer, tmp_path):
    """`--also`: a held-out document copied into another corpus's training split is seen
    only when that corpus is counted too; without it the figures are the plain split's."""
    body = "".join(f"def route_{i}(text, width={i}):\n    return text.split()[:width]\n" for i in range(40))
    own = "".join(f"class Node{i}:\n    weight = {i * 5 % 11}\n" for i in range(60))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / _name_in("test", "held")).write_text(body)
    (a / _name_in("train", "other")).write_text(own)
    (b / _name_in("train", "copy")).write_text(body + "# a copy in another corpus\n")
    for src in (a, b):
        build_dataset(tmp_path / f"ds-{src.name}", str(src), tokenizer=tiny_tokenizer, seq_len=64)
    runner = CliRunner()
    alone = runner.invoke(app, ["data", "overlap", str(tmp_path / "ds-a"), "-n", "8", "--json"])
    both = runner.invoke(app, ["data", "overlap", str(tmp_path / "ds-a"), "-n", "8", "--json",
                               "--also", str(tmp_path / "ds-b")])
    assert alone.exit_code == 0 and both.exit_code == 0, alone.output + both.output
    alone, both = json.loads(alone.stdout), json.loads(both.stdout)
    assert alone["share"] < 0.2 < 0.9 < both["share"]
    assert both["also"] == [str(tmp_path / "ds-b")] and both["ngrams"] == alone["ngrams"]
    assert both["reference_ngrams"] > alone["reference_ngrams"]
    rich = runner.invoke(app, ["data", "overlap", str(tmp_path / "ds-a"), "-n", "8",
                               "--also", str(tmp_path / "ds-b")], env={"COLUMNS": "200"})
    assert rich.exit_code == 0 and f"train + {tmp_path / 'ds-b'}:train" in rich.stdout



def test_document_shares_needs_an_index(tiny_corpus, tiny_tokenizer, tmp_path):
    build_dataset(tmp_path / "packed", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer,
                  seq_len=64, pack=True)
    packed = open_dataset(tmp_path / "packed", "test")
    with pytest.raises(ValueError, match="need a document index"):
        document_shares(packed, open_dataset(tmp_path / "packed", "train"))
