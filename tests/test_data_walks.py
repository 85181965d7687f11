"""A build never reads its own output; globs do not follow symlinked folders and give ids
independent of the other matches; folder walks count what they do not read (symlinked and
unreadable folders); a long line without newlines is encoded in pieces."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cir.data.shards import build_dataset
from cir.data.sources import SkipStats, iter_documents


def _files(root: Path, n: int, prefix: str = "f") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{prefix}{i}.txt").write_text(f"hello world, document number {i}\n" * 20)


def _doc_ids(ds: Path) -> list[str]:
    return [json.loads(line)["id"] for s in ("train", "val", "test")
            for line in (ds / f"{s}.docs.jsonl").read_text().splitlines()]


def test_a_build_inside_its_source_folder_reads_only_the_source(tmp_path, tiny_tokenizer):
    src = tmp_path / "src"
    _files(src / "docs", 30)
    for overwrite in (False, True):  # the second build also finds the first one in src
        manifest = build_dataset(src / "ds", src, tokenizer=tiny_tokenizer, seq_len=16,
                                 overwrite=overwrite)
        ids = _doc_ids(src / "ds")
        assert sorted(ids) == sorted(f"file:docs/f{i}.txt" for i in range(30)), ids
        assert manifest["skipped"]["counts"] == {}


def test_glob_does_not_follow_symlinked_folders(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    _files(src / "own", 2)
    _files(outside, 1, prefix="other")
    (src / "own" / "vendor").symlink_to(outside)  # a tree outside the source
    (src / "own" / "self").symlink_to(".")  # a loop
    docs = list(iter_documents(str(src / "**" / "*.txt")))
    assert sorted(d.id for d in docs) == ["file:own/f0.txt", "file:own/f1.txt"]


def test_glob_ids_do_not_depend_on_the_other_matches(tmp_path):
    src = tmp_path / "proj"
    _files(src / "pkg", 5)
    pattern = str(src / "**" / "*.txt")
    before = sorted(d.id for d in iter_documents(pattern))
    (src / "top.txt").write_text("a new file at the top\n")
    after = sorted(d.id for d in iter_documents(pattern))
    assert before == [f"file:pkg/f{i}.txt" for i in range(5)]
    assert after == sorted([*before, "file:top.txt"])


def test_glob_skips_hidden_names_unless_the_pattern_has_one(tmp_path):
    _files(tmp_path / "src" / ".hidden", 1)
    _files(tmp_path / "src", 1)
    assert [d.id for d in iter_documents(str(tmp_path / "src" / "**" / "*.txt"))] == ["file:f0.txt"]
    assert [d.id for d in iter_documents(str(tmp_path / "src" / ".*" / "*.txt"))] == ["file:.hidden/f0.txt"]
    assert len(list(iter_documents(str(tmp_path / "src" / "**")))) == 1


def test_a_symlinked_folder_in_a_walk_is_counted(tmp_path):
    _files(tmp_path / "src" / "d", 2)
    (tmp_path / "src" / "d" / "up").symlink_to("..")
    stats = SkipStats()
    assert len(list(iter_documents(str(tmp_path / "src"), stats))) == 2
    assert stats.counts == {"symlink": 1}


def test_an_unreadable_folder_in_a_walk_is_counted(tmp_path, monkeypatch):
    _files(tmp_path / "src" / "ok", 2)
    _files(tmp_path / "src" / "locked", 2)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = SkipStats()
    assert len(list(iter_documents(str(tmp_path / "src"), stats))) == 2
    assert stats.counts == {"unreadable": 1}


def test_a_long_single_line_is_encoded_piecewise_with_the_same_ids(tiny_tokenizer):
    from cir.data import chunking
    from cir.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    text = " ".join(f"word{i % 97}" for i in range(60_000))  # ~500 KB, no newline
    pieces = list(chunking._sub_pieces(text, chunking.ENCODE_CHARS))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert max(len(p) for p in pieces) <= chunking.ENCODE_CHARS
    assert chunking.encode_long(tok, text).tolist() == tok.encode(text, add_special_tokens=False).ids
