"""Document sources: files, globs, hf builders on local files, built-in corpora, skipping."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from cir.data import sources
from cir.data.hf import parse_hf_spec
from cir.data.sources import (
    SOURCES,
    BadFileError,
    Document,
    SkipStats,
    UnknownSourceError,
    describe_sources,
    iter_documents,
)
from cir.data.split import split_of


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def test_directory_source_reads_every_file_with_stable_relative_ids(tiny_corpus):
    docs = list(iter_documents(str(tiny_corpus / "code")))
    files = sorted(p for p in (tiny_corpus / "code").rglob("*") if p.is_file())
    assert len(docs) == len(files)
    by_id = {d.id: d for d in docs}
    for path in files:
        doc = by_id[f"file:{path.relative_to(tiny_corpus / 'code').as_posix()}"]
        assert doc.text == path.read_text()
        assert doc.source == "file"
    again = [d.id for d in iter_documents(str(tiny_corpus / "code"))]
    assert again == [d.id for d in docs]  # deterministic order


def test_document_is_frozen():
    doc = Document("a", "b", "c")
    with pytest.raises(AttributeError):
        doc.text = "x"  # type: ignore[misc]


def test_glob_and_file_list_sources(tiny_corpus):
    pattern = str(tiny_corpus / "**" / "*.py")
    globbed = {d.id for d in iter_documents(pattern)}
    assert len(globbed) == len(list(tiny_corpus.rglob("*.py")))
    assert all(i.endswith(".py") for i in globbed)
    two = sorted((tiny_corpus / "prose").rglob("*.txt"))[:2]
    listed = list(iter_documents([str(p) for p in two]))
    assert sorted(d.text for d in listed) == sorted(p.read_text() for p in two)
    (one,) = iter_documents(str(two[0]))
    assert one.id == f"file:{two[0].name}"


def test_same_file_names_in_a_list_get_distinct_ids(tmp_path):
    a = _write(tmp_path / "a" / "x.txt", "first")
    b = _write(tmp_path / "b" / "x.txt", "second")
    assert sorted(d.id for d in iter_documents([str(a), str(b)])) == ["file:a/x.txt", "file:b/x.txt"]


def test_unknown_source_lists_valid_names(tmp_path):
    with pytest.raises(UnknownSourceError) as err:
        list(iter_documents(str(tmp_path / "nope")))
    for name in SOURCES:
        assert name in str(err.value)
    with pytest.raises(UnknownSourceError, match="no file"):
        list(iter_documents(str(tmp_path / "*.zzz")))


def test_random_is_a_dataset_not_a_document_source():
    with pytest.raises(UnknownSourceError, match="open_dataset"):
        iter_documents("random")


def test_hf_text_builder_on_local_files(tmp_path):
    lines = ["first line é", "", "second line 中文", "third 🙂"]
    path = _write(tmp_path / "a.txt", "\n".join(lines) + "\n")
    stats = SkipStats()
    docs = list(iter_documents(f"hf:text?data_files={path}", stats))
    assert [d.text for d in docs] == [x for x in lines if x]
    assert stats.counts["empty"] == 1  # the blank line
    assert docs[0].id == "hf:text/train/0" and docs[0].source == "hf:text"


def test_hf_json_builder_picks_text_or_first_string_column(tmp_path):
    rows = [{"n": i, "body": f"body {i}", "title": f"t{i}"} for i in range(3)]
    path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    docs = list(iter_documents(f"hf:json?data_files={path}"))
    assert [d.text for d in docs] == ["body 0", "body 1", "body 2"]
    docs = list(iter_documents(f"hf:json?data_files={path}&column=title"))
    assert [d.text for d in docs] == ["t0", "t1", "t2"]
    with_text = _write(tmp_path / "b.jsonl", json.dumps({"id": "x7", "meta": "m", "text": "hello"}))
    (doc,) = iter_documents(f"hf:json?data_files={with_text}&streaming=0")
    assert (doc.id, doc.text) == ("hf:json/train/x7", "hello")



def test_hf_repeated_ids_get_the_row_index_and_spread_over_the_splits(tmp_path):
    rows = [{"id": 7, "text": f"row {i}"} for i in range(50)]  # a constant id column
    rows += [{"id": None, "text": "null id"}, {"id": "7#1", "text": "looks generated"}]
    path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    ids = [d.id for d in iter_documents(f"hf:json?data_files={path}")]
    assert len(set(ids)) == len(ids) == 52
    assert ids[:3] == ["hf:json/train/7", "hf:json/train/7#1", "hf:json/train/7#2"]
    assert ids[50] == "hf:json/train/50" and ids[51] == "hf:json/train/7#1#51"
    assert {split_of(i) for i in ids} == {"train", "val", "test"}


def test_hf_non_string_column_is_not_text_and_null_is_empty(tmp_path):
    rows = [{"n": i, "body": None if i == 1 else f"body {i}"} for i in range(3)]
    path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows))
    stats = SkipStats()
    assert list(iter_documents(f"hf:json?data_files={path}&column=n", stats)) == []
    assert dict(stats.counts) == {"not-text": 3}
    with pytest.raises(BadFileError, match="not-text .column 'n' holds int, not text"):
        list(iter_documents(f"hf:json?data_files={path}&column=n", strict=True))
    stats = SkipStats()
    assert [d.text for d in iter_documents(f"hf:json?data_files={path}&column=body", stats)] == ["body 0", "body 2"]
    assert dict(stats.counts) == {"empty": 1}

def test_parse_hf_spec():
    spec = parse_hf_spec("hf:wikitext:wikitext-103-raw-v1:validation")
    assert (spec.dataset, spec.config, spec.split) == ("wikitext", "wikitext-103-raw-v1", "validation")
    spec = parse_hf_spec("hf:codeparrot/codeparrot-clean")
    assert (spec.dataset, spec.config, spec.split, spec.streaming) == ("codeparrot/codeparrot-clean", None, "train", True)
    with pytest.raises(UnknownSourceError):
        parse_hf_spec("hf:")


def test_builtin_sources_are_listed_with_presence():
    rows = {r["name"]: r for r in describe_sources()}
    assert set(SOURCES) | {"random"} == set(rows)
    assert rows["python-code"]["present"] and rows["python-docs"]["present"]


def test_python_docs_starts_with_pydoc_topics():
    doc = next(iter(iter_documents("python-docs")))
    assert doc.id.startswith("python-docs:pydoc/") and doc.source == "python-docs"
    assert doc.text.strip()


def test_python_code_walks_python_roots(monkeypatch, tiny_corpus):
    roots = [label for label, _ in sources.python_roots()]
    assert "stdlib" in roots
    monkeypatch.setattr(sources, "python_roots", lambda: [("stdlib", tiny_corpus / "code")])
    docs = list(iter_documents("python-code"))
    assert len(docs) == len(list((tiny_corpus / "code").rglob("*.py")))
    assert all(d.id.startswith("python-code:stdlib/pkg") for d in docs)


def test_c_code_and_man_pages(monkeypatch, tmp_path):
    _write(tmp_path / "inc" / "sys" / "a.h", "#define A 1\nint f(void);\n")
    _write(tmp_path / "inc" / "b.txt", "not a header")
    monkeypatch.setattr(sources, "INCLUDE_ROOT", tmp_path / "inc")
    assert [d.id for d in iter_documents("c-code")] == ["c-code:include/sys/a.h"]

    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.TP\n.BR \\-a ", " \\-\\-all\nshow all\n'
    _write(tmp_path / "man" / "man1" / "ls.1.gz", gzip.compress(roff.encode()))
    _write(tmp_path / "man" / "man1" / "dir.1.gz", gzip.compress(b".so man1/ls.1\n"))
    _write(tmp_path / "man" / "de" / "man1" / "ls.1.gz", gzip.compress(b"Deutsch\n"))
    _write(tmp_path / "man" / "man1" / "bad.1.gz", b"not gzip")
    monkeypatch.setattr(sources, "MAN_ROOT", tmp_path / "man")
    stats = SkipStats()
    (doc,) = iter_documents("man-pages", stats)
    assert doc.id == "man-pages:man1/ls.1.gz"
    assert doc.text == "NAME\nls - list directory contents\n\n-a, --all\nshow all\n"
    assert stats.counts["unreadable"] == 1 and stats.counts["filtered"] == 1


# --------------------------------------------------------------------------- skipping


@pytest.fixture
def bad_dir(tmp_path) -> Path:
    _write(tmp_path / "good.py", "x = 1\n")
    _write(tmp_path / "binary.bin", b"abc\x00def" * 10)
    _write(tmp_path / "latin1.txt", "café".encode("latin-1"))
    _write(tmp_path / "empty.txt", "  \n\t\n")
    _write(tmp_path / "big.txt", "a" * 5000)
    return tmp_path


def test_bad_files_are_skipped_and_counted(bad_dir):
    stats = SkipStats()
    docs = list(iter_documents(str(bad_dir), stats, max_file_bytes=4096))
    assert [d.id for d in docs] == ["file:good.py"]
    assert dict(stats.counts) == {"binary": 1, "non-utf8": 1, "empty": 1, "too-large": 1}
    assert stats.examples["binary"] == [str(bad_dir / "binary.bin")]


def test_default_size_cap_is_8_mib(tmp_path):
    with open(_write(tmp_path / "huge.txt", b""), "wb") as f:
        f.truncate(8 * 2**20 + 1)  # sparse: the cap is checked before reading
    _write(tmp_path / "ok.txt", "fine")
    stats = SkipStats()
    assert [d.text for d in iter_documents(str(tmp_path), stats)] == ["fine"]
    assert stats.counts["too-large"] == 1


@pytest.mark.parametrize("name", ["binary.bin", "latin1.txt", "empty.txt"])
def test_strict_raises_on_the_first_bad_file(bad_dir, name):
    with pytest.raises(BadFileError, match=name):
        list(iter_documents(str(bad_dir / name), strict=True))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads mode-000 files")
def test_unreadable_file_is_skipped(tmp_path):
    path = _write(tmp_path / "secret.txt", "hidden")
    _write(tmp_path / "open.txt", "visible")
    path.chmod(0)
    try:
        stats = SkipStats()
        assert [d.text for d in iter_documents(str(tmp_path), stats)] == ["visible"]
        assert stats.counts["unreadable"] == 1
    finally:
        path.chmod(0o644)


def test_unreadable_path_is_counted(monkeypatch, tmp_path):
    """Same branch as a mode-000 file, reachable as root: open() raises OSError."""
    _write(tmp_path / "a.txt", "text")
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    stats = SkipStats()
    assert list(iter_documents(str(tmp_path), stats)) == []
    assert stats.counts["unreadable"] == 1
    with pytest.raises(BadFileError, match="unreadable"):
        list(iter_documents(str(tmp_path), strict=True))


def test_utf8_bom_is_dropped(tmp_path):
    _write(tmp_path / "bom.txt", "\ufeffhello".encode())
    assert [d.text for d in iter_documents(str(tmp_path))] == ["hello"]


def test_python_docstrings(monkeypatch, tmp_path):
    _write(tmp_path / "lib" / "m.py", '"""Module doc."""\n\nclass A:\n    """Class doc.\n\n    More."""\n\n    def f(self):\n        """Method doc."""\n\n\ndef g():\n    return 1\n')
    _write(tmp_path / "lib" / "nodoc.py", "x = 1\n")
    _write(tmp_path / "lib" / "broken.py", "def (:\n")
    monkeypatch.setattr(sources, "python_roots", lambda: [("stdlib", tmp_path / "lib")])
    stats = SkipStats()
    (doc,) = iter_documents("python-docstrings", stats)
    assert doc.id == "python-docstrings:stdlib/m.py"
    assert doc.text == "Module doc.\n\nClass doc.\n\nMore.\n\nMethod doc.\n"
    assert stats.counts["filtered"] == 2


def _package_docs(monkeypatch, lib, topics: dict, source: str) -> tuple[dict, SkipStats]:
    """Documents of a docs ``source`` over a fake site-packages ``lib`` and pydoc ``topics``."""
    monkeypatch.setattr(sources, "python_roots", lambda: [("site-packages", lib)])
    monkeypatch.setattr(sources, "pydoc_topics", lambda: topics)
    stats = SkipStats()
    return {d.id: d.text for d in iter_documents(source, stats)}, stats


def test_python_docs_package_files(monkeypatch, tmp_path):
    lib = tmp_path / "lib"
    _write(lib / "pkg" / "README.md", "# Title\n\nSome words about the package.\n")
    _write(lib / "pkg-1.0.dist-info" / "METADATA", "Name: pkg\nVersion: 1.0\n\nLong description here.\n")
    _write(lib / "pkg-1.0.dist-info" / "LICENSE.txt", "Permission is hereby granted\n")
    _write(lib / "pkg-1.0.dist-info" / "top_level.txt", "pkg\n")
    _write(lib / "pkg" / "data" / "table.txt", "1.0 2.0 3.0\n4.5 6.7 8.9\n")
    _write(lib / "pkg" / "tests" / "data" / "mail.txt", "From: a@b.c\n\nhello\n")
    docs, stats = _package_docs(monkeypatch, lib, {"if": "The if statement."}, "python-docs")
    assert docs == {
        "python-docs:pydoc/if": "The if statement.",
        "python-docs:site-packages/pkg/README.md": "# Title\n\nSome words about the package.\n",
        "python-docs:site-packages/pkg-1.0.dist-info/METADATA": "Long description here.\n",
    }
    assert dict(stats.counts) == {"filtered": 1}


def test_strip_code_keeps_prose_only():
    text = (
        "# Title\n\nSome words about `x`.\n\n```python\nimport x\n\nx.run()\n```\n\n"
        "Example::\n\n    >>> f(1)\n    2\n\nBack to prose.\n>>> g()\n... h()\n$ pip install x\n\n"
        ".. code-block:: python\n\n   a = 1\n\n   b = 2\n\nDone.\n    indented code\n"
        "~~~\nfenced = True\n~~~\nTail line.\n"
    )
    assert sources.strip_code(text) == (
        "# Title\n\nSome words about `x`.\n\nExample:\n\nBack to prose.\n\nDone.\nTail line.\n"
    )
    rendered = "It is used so:\n\n   if_stmt ::= suite\n\nMore text.\n"  # pydoc indents by 3
    assert sources.strip_code(rendered, min_indent=3) == "It is used so:\n\nMore text.\n"
    assert sources.strip_code(rendered) == rendered  # 3 columns is prose for Markdown


def test_python_prose_source(monkeypatch, tmp_path):
    lib = tmp_path / "lib"
    _write(lib / "pkg" / "README.md", "# Pkg\n\nUse it like this:\n\n```\npkg.run()\n```\n\nThat is all.\n")
    _write(lib / "pkg" / "CODE.md", "```\nonly_code()\n```\n")
    docs, stats = _package_docs(monkeypatch, lib, {"if": "The if statement:\n\n   if x: y\n"},
                                "python-prose")
    assert docs == {
        "python-prose:pydoc/if": "The if statement:\n",
        "python-prose:site-packages/pkg/README.md": "# Pkg\n\nUse it like this:\n\nThat is all.\n",
    }
    assert dict(stats.counts) == {"filtered": 1}  # nothing left of CODE.md


def test_a_huge_size_cap_reads_files_without_allocating_it(tmp_path):
    from cir.data.sources import ReadOptions, read_bytes

    path = tmp_path / "a.txt"
    path.write_bytes(b"x = 1\n" * 5000)
    opts = ReadOptions(SkipStats(), max_bytes=2**50)  # one read of the cap would fail
    assert read_bytes(path, opts) == path.read_bytes()
    small = ReadOptions(SkipStats(), max_bytes=10)  # the size check comes first
    assert read_bytes(path, small) is None and small.stats.counts["too-large"] == 1
