"""Chunk shards: build, zero-copy read, masks, manifest, packing, interrupted builds, chunking text."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from cir.data import chunking, shards
from cir.data.chunking import chunk_ids, chunk_text, iter_text_chunks
from cir.data.shards import build_dataset, dataset_summary, open_dataset
from cir.data.sources import iter_documents
from cir.data.split import SPLITS, split_of
from cir.data.tokenizer import EOS_ID, PAD_ID, decode, encode, load_tokenizer, tokenizer_hash

from cir.paths import datasets_dir

SEQ = 64


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def _doc_chunks(tok, docs, split):
    """Reference: per-document chunking of one split, in source order."""
    parts = [chunk_ids(encode(tok, d.text), SEQ) for d in docs if split_of(d.id) == split]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_dataset_matches_per_document_reference(tiny_dataset, tiny_corpus, tok):
    docs = list(iter_documents(str(tiny_corpus / "code")))
    for split in SPLITS:
        ds = open_dataset(tiny_dataset, split)
        ids, lengths = _doc_chunks(tok, docs, split)
        np.testing.assert_array_equal(np.asarray(ds.ids), ids)
        np.testing.assert_array_equal(ds.lengths, lengths)
        assert len(ds) == len(ids) and ds.seq_len == SEQ and ds.vocab_size == 512


def test_read_is_zero_copy_memmap(tiny_dataset):
    ds = open_dataset(tiny_dataset, "train")
    assert isinstance(ds.ids, np.memmap) and ds.ids.dtype == np.uint16
    assert ds.ids.shape == (len(ds), SEQ)
    assert not ds.ids.flags.writeable
    assert np.shares_memory(ds.ids[:3], ds.ids)
    again = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000 and isinstance(again.ids, np.memmap)
    np.testing.assert_array_equal(again.ids, ds.ids)


def test_get_batch_ids_and_mask(tiny_dataset):
    ds = open_dataset(tiny_dataset, "train")
    idx = np.arange(len(ds))
    ids, mask = ds.get_batch(idx)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (len(ds), SEQ)
    assert torch.equal(mask.sum(1), torch.as_tensor(ds.lengths, dtype=torch.long))
    assert bool((ids[~mask] == PAD_ID).all()) and bool((ids[mask] != PAD_ID).all())
    # padding only at the tail: once False, stays False
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())
    assert (ds.lengths < SEQ).sum() > 0  # some documents end mid-chunk
    one_ids, one_mask = ds.get_batch([5, 2])
    assert torch.equal(one_ids, ids[[5, 2]]) and torch.equal(one_mask, mask[[5, 2]])


def test_manifest_contents(tiny_dataset, tiny_tokenizer, tiny_corpus):
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    for key in ("name", "source", "seq_len", "vocab_size", "dtype", "tokenizer_sha256", "splits",
                "skipped", "created_at", "format_version"):
        assert key in manifest
    assert manifest["tokenizer_sha256"] == tokenizer_hash(tiny_tokenizer) == tokenizer_hash(tiny_dataset / "tokenizer.json")
    assert manifest["source"] == str(tiny_corpus / "code") and manifest["name"] == "tiny-code"
    docs = list(iter_documents(str(tiny_corpus / "code")))
    for split in SPLITS:
        stats = manifest["splits"][split]
        mine = [d for d in docs if split_of(d.id) == split]
        assert stats["documents"] == len(mine)
        assert stats["bytes"] == sum(len(d.text.encode()) for d in mine)
        ds = open_dataset(tiny_dataset, split)
        assert stats["tokens"] == int(ds.lengths.sum()) and stats["chunks"] == len(ds)
    assert sum(manifest["splits"][s]["documents"] for s in SPLITS) == len(docs)
    summary = dataset_summary(tiny_dataset)
    held = [manifest["splits"][s] for s in ("val", "test")]
    assert summary["heldout_bytes_per_token"] == pytest.approx(sum(h["bytes"] for h in held) / sum(h["tokens"] for h in held))


def test_chunk_text_equals_dataset_chunks_of_one_file(tiny_corpus, tiny_tokenizer, tok, tmp_path):
    path = sorted((tiny_corpus / "prose").rglob("*.txt"))[0]
    out = build_dataset(tmp_path / "one", str(path), tokenizer=tiny_tokenizer, seq_len=SEQ)
    split = next(s for s in SPLITS if out["splits"][s]["documents"])
    ds = open_dataset(tmp_path / "one", split)
    ids, lengths = chunk_text(path.read_text(), tok, SEQ)
    assert ids.dtype == np.int64 and lengths.dtype == np.int32
    np.testing.assert_array_equal(ids, np.asarray(ds.ids))
    np.testing.assert_array_equal(lengths, ds.lengths)
    assert decode(tok, ids.reshape(-1)[: lengths.sum()]) == path.read_text()


def test_chunk_ids_shapes():
    ids, lengths = chunk_ids(list(range(2, 12)), 4)
    assert ids.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 0, 0]] and lengths.tolist() == [4, 4, 2]
    ids, lengths = chunk_ids([], 4)
    assert ids.shape == (0, 4) and lengths.shape == (0,)


@pytest.mark.parametrize("encode_chars", [2**16, 150])
def test_iter_text_chunks_streams_the_same_chunks(tok, tiny_corpus, tmp_path, monkeypatch, encode_chars):
    monkeypatch.setattr(chunking, "ENCODE_CHARS", encode_chars)
    texts = [p.read_text() for p in sorted(tiny_corpus.rglob("*"))[:40] if p.is_file()]
    text = "é中🙂 mixed\n".join(texts) + "tail without newline 中文"
    path = tmp_path / "big.txt"
    path.write_text(text)
    want_ids, want_len = chunk_text(text, tok, SEQ)
    for read in (97, 1000, 10**7):  # tiny reads split multi-byte characters too
        parts = list(iter_text_chunks(path, tok, SEQ, max_bytes_per_read=read))
        got_ids = np.concatenate([p[0] for p in parts])
        got_len = np.concatenate([p[1] for p in parts])
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_len, want_len)
    assert len(list(iter_text_chunks(path, tok, SEQ, max_bytes_per_read=1000))) > 5


def test_packed_build(tiny_corpus, tiny_tokenizer, tok, tmp_path):
    manifest = build_dataset(tmp_path / "packed", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=SEQ, pack=True)
    docs = list(iter_documents(str(tiny_corpus / "prose")))
    ds = open_dataset(tmp_path / "packed", "train")
    assert (ds.lengths[:-1] == SEQ).all() and 0 < ds.lengths[-1] <= SEQ  # only the split's tail is padded
    flat = np.asarray(ds.ids).reshape(-1)[: int(ds.lengths.sum())].astype(np.int64)
    want = np.concatenate([[*encode(tok, d.text), EOS_ID] for d in docs if split_of(d.id) == "train"])
    np.testing.assert_array_equal(flat, want)
    assert manifest["pack"] is True and manifest["splits"]["train"]["tokens"] == len(want) - manifest["splits"]["train"]["documents"]


def test_max_tokens_stops_early(tiny_corpus, tiny_tokenizer, tmp_path):
    full = build_dataset(tmp_path / "full", str(tiny_corpus), tokenizer=tiny_tokenizer, seq_len=SEQ)
    part = build_dataset(tmp_path / "part", str(tiny_corpus), tokenizer=tiny_tokenizer, seq_len=SEQ, max_tokens=2000)
    assert part["truncated"] and not full["truncated"]
    assert 2000 <= part["splits"]["train"]["tokens"] < full["splits"]["train"]["tokens"]


def test_trains_its_own_tokenizer_on_the_train_split(tiny_corpus, tmp_path):
    manifest = build_dataset(tmp_path / "own", str(tiny_corpus / "code"), vocab_size=300, seq_len=SEQ)
    assert manifest["vocab_size"] == 300
    assert load_tokenizer(tmp_path / "own" / "tokenizer.json").get_vocab_size() == 300


def test_interrupted_build_leaves_nothing(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = shards.SplitWriter.add

    def exploding_add(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk on fire")
        return real_add(self, *args)

    monkeypatch.setattr(shards.SplitWriter, "add", exploding_add)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_dataset(tmp_path / "ds", str(tiny_corpus), tokenizer=tiny_tokenizer, seq_len=SEQ)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_and_existing_target(tiny_corpus, tiny_tokenizer, tmp_path):
    build_dataset(tmp_path / "ds", str(tiny_corpus / "code"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    with pytest.raises(FileExistsError):
        build_dataset(tmp_path / "ds", str(tiny_corpus / "code"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    m = build_dataset(tmp_path / "ds", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=32, overwrite=True)
    assert open_dataset(tmp_path / "ds", "train").seq_len == 32 == m["seq_len"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_duplicates_dropped_and_empty_corpus_is_an_error(tiny_tokenizer, tmp_path):
    for i in range(6):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.txt").write_text("same text everywhere\n" if i % 2 else f"text number {i}\n")
    m = build_dataset(tmp_path / "ds", str(tmp_path / "src"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    assert m["skipped"]["counts"] == {"duplicate": 2}
    assert sum(s["documents"] for s in m["splits"].values()) == 4
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n")
    with pytest.raises(ValueError, match="no training documents"):
        build_dataset(tmp_path / "none", str(tmp_path / "blank"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    assert not (tmp_path / "none").exists()


def test_open_by_name_under_cir_home_and_errors(tiny_dataset):
    import shutil

    shutil.copytree(tiny_dataset, datasets_dir() / "mine")
    ds = open_dataset("mine", "val")
    assert len(ds) == len(open_dataset(tiny_dataset, "val"))
    assert ds.tokenizer_path == datasets_dir() / "mine" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="mine"):  # lists what is available
        open_dataset("nope", "train")
    with pytest.raises(ValueError, match="split"):
        open_dataset("mine", "dev")


def test_truncated_shard_is_detected(tiny_dataset, tmp_path):
    import shutil

    shutil.copytree(tiny_dataset, tmp_path / "ds")
    with open(tmp_path / "ds" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="manifest says"):
        open_dataset(tmp_path / "ds", "train")


def test_random_chunks_deterministic_and_in_range():
    a = open_dataset("random", "test", seq_len=32, vocab_size=100, n_chunks=50, seed=3)
    b = open_dataset("random", "test", seq_len=32, vocab_size=100, n_chunks=50, seed=3)
    c = open_dataset("random", "val", seq_len=32, vocab_size=100, n_chunks=50, seed=3)
    ids, mask = a.get_batch(np.arange(50))
    assert ids.shape == (50, 32) and bool(mask.all()) and len(a) == 50
    assert int(ids.min()) >= 2 and int(ids.max()) < 100
    assert torch.equal(ids, b.get_batch(np.arange(50))[0])
    assert not torch.equal(ids, c.get_batch(np.arange(50))[0])
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=100)[2:]
    assert counts.min() > 0  # roughly uniform over [2, vocab)
    assert a.seq_len == 32 and a.vocab_size == 100 and a.tokenizer_path is None


def test_piecewise_encoding_equals_one_call(tok, tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    text = "\n".join(p.read_text() for p in sorted(tiny_corpus.rglob("*")) if p.is_file())
    want = encode(tok, text)
    monkeypatch.setattr(chunking, "ENCODE_CHARS", 300)
    assert chunking.encode_long(tok, text).tolist() == want
    # many texts, long (piecewise), short and empty, in one batched call: ids as one by one
    texts = [text, "def f():\n    return 1\n", "", text[:299], text[: len(text) // 2]]
    got = chunking.encode_many(tok, texts)
    assert [g.tolist() for g in got] == [encode(tok, t) for t in texts]
    assert all(g.dtype == np.int64 for g in got)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "long.txt").write_text(text)
    build_dataset(tmp_path / "ds", str(tmp_path / "src"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    split = split_of("file:long.txt")
    ds = open_dataset(tmp_path / "ds", split)
    assert np.asarray(ds.ids).reshape(-1)[: int(ds.lengths.sum())].tolist() == want


def test_all_splits_is_train_val_test_in_order(tiny_dataset):
    parts = [open_dataset(tiny_dataset, s) for s in SPLITS]
    every = open_dataset(tiny_dataset, "all")
    assert len(every) == sum(len(p) for p in parts) > 0
    assert (every.seq_len, every.vocab_size, every.tokenizer_path) == (
        parts[0].seq_len, parts[0].vocab_size, parts[0].tokenizer_path)
    ref_ids = torch.cat([p.get_batch(np.arange(len(p)))[0] for p in parts])  # [N, T]
    ref_mask = torch.cat([p.get_batch(np.arange(len(p)))[1] for p in parts])
    order = np.random.default_rng(0).permutation(len(every))  # any order, mixed splits
    ids, mask = every.get_batch(order)
    assert torch.equal(ids, ref_ids[order]) and torch.equal(mask, ref_mask[order])
    with pytest.raises(IndexError, match="out of range"):
        every.get_batch([len(every)])


def test_document_index_maps_chunks_to_their_documents(tiny_dataset, tiny_corpus, tok):
    """Each chunk's document, read from <split>.docs.jsonl, is the one its tokens came from."""
    texts = {d.id: d.text for d in iter_documents(str(tiny_corpus / "code"))}
    for split in SPLITS:
        ds = open_dataset(tiny_dataset, split)
        index = ds.documents()
        assert len(index) == ds.manifest["splits"][split]["documents"]
        assert all(split_of(i) == split for i in index.ids)
        doc_of = index.of_chunks(np.arange(len(ds)))
        assert (np.diff(doc_of) >= 0).all()  # chunk order is document order
        for d, doc_id in enumerate(index.ids):
            rows = np.nonzero(doc_of == d)[0]
            tokens = np.concatenate([np.asarray(ds.ids[r, : ds.lengths[r]]) for r in rows])
            assert decode(tok, tokens) == texts[doc_id]
    every = open_dataset(tiny_dataset, "all")
    whole = every.documents()
    assert len(whole) == sum(len(open_dataset(tiny_dataset, s).documents()) for s in SPLITS)
    val = open_dataset(tiny_dataset, "val")
    first_val = len(open_dataset(tiny_dataset, "train"))  # AllSplits: train, then val
    assert whole.ids[whole.of_chunks([first_val])[0]] == val.documents().ids[0]


def test_document_index_edge_cases(tiny_corpus, tiny_tokenizer, tmp_path):
    index = shards.DocumentIndex(["a", "empty", "b"], np.array([0, 2, 2, 5]))
    assert index.of_chunks([0, 1, 2, 4]).tolist() == [0, 0, 2, 2]  # "empty" owns no chunk
    with pytest.raises(IndexError):
        index.of_chunks([5])
    packed = build_dataset(tmp_path / "p", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer,
                           seq_len=SEQ, pack=True)
    assert packed["pack"] and open_dataset(tmp_path / "p", "train").documents() is None
    build_dataset(tmp_path / "d", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    docs = tmp_path / "d" / "train.docs.jsonl"
    lines = docs.read_text().splitlines()
    docs.write_text("\n".join(lines[:-1]) + "\n")  # one document short
    with pytest.raises(ValueError, match="train.docs.jsonl: indexes"):
        open_dataset(tmp_path / "d", "train").documents()
    docs.write_text("not json\n")
    with pytest.raises(ValueError, match="train.docs.jsonl:1: not a document index line"):
        open_dataset(tmp_path / "d", "train").documents()
    docs.unlink()  # a dataset built before indexes: reads as before, without one
    ds = open_dataset(tmp_path / "d", "train")
    assert ds.documents() is None and len(ds) > 0
    assert open_dataset(tmp_path / "d", "all").documents() is None


def test_concat_chunks_joins_datasets_end_to_end(tiny_dataset, tiny_prose_dataset, tiny_corpus,
                                                 tiny_tokenizer, tmp_path):
    from cir.data.shards import ConcatChunks

    a, b = open_dataset(tiny_dataset, "train"), open_dataset(tiny_prose_dataset, "train")
    both = ConcatChunks([a, b])
    assert len(both) == len(a) + len(b) and both.split == "train"
    ref = [torch.cat([a.get_batch(np.arange(len(a)))[k], b.get_batch(np.arange(len(b)))[k]]) for k in (0, 1)]
    order = np.random.default_rng(1).permutation(len(both))  # mixed parts, any order
    ids, mask = both.get_batch(order)
    assert torch.equal(ids, ref[0][order]) and torch.equal(mask, ref[1][order])
    assert both.documents().ids == a.documents().ids + b.documents().ids
    assert both.chunk_info(len(a) + 1) == b.chunk_info(1) and both.chunk_info(0) == a.chunk_info(0)
    with pytest.raises(IndexError, match="out of range"):
        both.get_batch([-1])
    shutil.copytree(tiny_prose_dataset, tmp_path / "retok")  # same shapes, another tokenizer
    manifest = json.loads((tmp_path / "retok" / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (tmp_path / "retok" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="different tokenizers"):
        ConcatChunks([a, open_dataset(tmp_path / "retok", "train")])
    build_dataset(tmp_path / "short", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=32)
    with pytest.raises(ValueError, match=r"cannot join .*short:train \(seq_len 32"):
        ConcatChunks([a, open_dataset(tmp_path / "short", "train")])


def _copy(dataset, tmp_path, name="ds"):
    return shutil.copytree(dataset, tmp_path / name)


@pytest.mark.parametrize("text, problem", [
    ('{"format_version": 1, "splits": {', "Expecting"),  # torn by a crash or a full disk
    ("[1, 2]", "a JSON list, not an object"),
    ("\xff\xfe", "not a dataset manifest"),
])
def test_a_manifest_that_is_not_json_or_not_an_object_is_named(tiny_dataset, tmp_path, text, problem):
    root = _copy(tiny_dataset, tmp_path)
    (root / "manifest.json").write_bytes(text.encode("latin-1"))
    for read in (lambda: open_dataset(root, "train"), lambda: dataset_summary(root)):
        with pytest.raises(ValueError, match="manifest.json: not a dataset manifest") as info:
            read()
        assert problem in str(info.value) and "rebuild" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["splits"].pop("val"), "no splits.val"),
    (lambda m: m["splits"]["test"].update(chunks="12"), "splits.test"),
    (lambda m: m.pop("seq_len"), "no seq_len"),
    (lambda m: m.update(dtype="float64"), "dtype"),
])
def test_a_manifest_of_the_wrong_shape_is_named(tiny_dataset, tmp_path, edit, problem):
    root = _copy(tiny_dataset, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for read in (lambda: open_dataset(root, "train"), lambda: dataset_summary(root)):
        with pytest.raises(ValueError, match="manifest.json: not a dataset manifest") as info:
            read()
        assert problem in str(info.value)


def test_another_format_version_is_refused_by_summary_too(tiny_dataset, tmp_path):
    root = _copy(tiny_dataset, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    for read in (lambda: open_dataset(root, "val"), lambda: dataset_summary(root)):
        with pytest.raises(ValueError, match="dataset format 99 != 1, rebuild it"):
            read()


def test_summary_lists_damaged_shard_files(tiny_dataset, tmp_path):
    assert dataset_summary(tiny_dataset)["damaged"] == []
    root = _copy(tiny_dataset, tmp_path)
    (root / "val.bin").unlink()
    with open(root / "test.len", "r+b") as f:
        f.truncate(8)
    damaged = dataset_summary(root)["damaged"]
    test_len = 4 * json.loads((root / "manifest.json").read_text())["splits"]["test"]["chunks"]
    assert damaged == [f"{root / 'val.bin'}: missing", f"{root / 'test.len'}: 8 bytes, manifest says {test_len}"]
    with pytest.raises(ValueError, match="val.bin: missing; rebuild the dataset"):
        open_dataset(root, "val")
    with pytest.raises(ValueError, match="test.len: 8 bytes, manifest says"):
        open_dataset(root, "test")
    assert len(open_dataset(root, "train")) > 0  # the undamaged split still opens


def _one_train_file(tmp_path):
    """A source of one document, which the id hash puts in train: val and test get none."""
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.txt").write_text("a single small document, hashed into train\n")
    assert split_of("file:a.txt") == "train"
    return src


def test_empty_val_and_test_are_warnings_in_the_manifest(tiny_dataset, tiny_tokenizer, tmp_path):
    assert json.loads((tiny_dataset / "manifest.json").read_text())["warnings"] == []
    m = build_dataset(tmp_path / "ds", str(_one_train_file(tmp_path)), tokenizer=tiny_tokenizer, seq_len=SEQ)
    assert m["splits"]["train"]["documents"] == 1
    assert len(m["warnings"]) == 2
    assert "val split has no documents" in m["warnings"][0] and "test split has no documents" in m["warnings"][1]
    assert dataset_summary(tmp_path / "ds")["warnings"] == m["warnings"]


def test_manifest_name_is_the_given_name_or_the_folder(tiny_corpus, tiny_tokenizer, tmp_path):
    named = build_dataset(tmp_path / "place", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer,
                          seq_len=SEQ, name="mine")
    assert named["name"] == "mine" == dataset_summary(tmp_path / "place")["name"]
    unnamed = build_dataset(tmp_path / "other", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=SEQ)
    assert unnamed["name"] == "other"
