"""`route-cli data build | show | info` on hostile input: bad names, --overwrite of things
that are not datasets, FIFOs and broken symlinks in a source, SIGTERM, bad numbers, a
--tokenizer that is not one, an unreachable hf: dataset."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _reliability import cli_env
from cir.cli.main import app
from cir.data.shards import build_dataset
from cir.data.split import split_of
from typer.testing import CliRunner

from cir.paths import cir_home, datasets_dir

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["data", *args])


def _src(tmp_path: Path, n: int = 6) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"good{i}.txt").write_text(f"hello world, small good file {i}\n" * 20)
    return src


def _build(name: str, src: Path, tok: Path, *extra: str):
    return _invoke("build", name, "--source", str(src), "--tokenizer", str(tok), "--seq-len", "16", *extra)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["", "..", "../escape", "a/b", ".hidden", "with space"])
def test_build_refuses_names_that_are_not_plain_folder_names(name, tmp_path, tiny_tokenizer):
    src = _src(tmp_path)
    assert _build("keep", src, tiny_tokenizer).exit_code == 0
    before = _tree(cir_home())
    result = _build(name, src, tiny_tokenizer, "--overwrite")
    assert result.exit_code == 2 and "invalid dataset name" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _tree(cir_home()) == before  # nothing replaced, nothing written beside datasets/


def test_overwrite_replaces_only_a_dataset_or_an_empty_folder(tmp_path, tiny_tokenizer):
    src = _src(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    plain = tmp_path / "plain"
    plain.write_text("a file")
    for target in (other, plain):
        before = _tree(tmp_path)
        result = _build("x", src, tiny_tokenizer, "--out", str(target), "--overwrite")
        assert result.exit_code == 2 and str(target) in result.output, result.output
        assert _tree(tmp_path) == before  # no hidden .old-/.building- leftovers either
    assert (other / "important.txt").read_text() == "keep me" and plain.read_text() == "a file"
    with pytest.raises(FileExistsError, match="not a dataset"):
        build_dataset(other, str(src), tokenizer=tiny_tokenizer, seq_len=16, overwrite=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build("x", src, tiny_tokenizer, "--out", str(empty), "--overwrite").exit_code == 0
    again = _build("x", src, tiny_tokenizer, "--out", str(empty), "--overwrite", "--seq-len", "32")
    assert again.exit_code == 0, again.output
    assert json.loads((empty / "manifest.json").read_text())["seq_len"] == 32


@contextmanager
def _unblock_fifo(path: Path, every: float = 5.0) -> Iterator[None]:
    """Open the FIFO's write end every ``every`` s: a reader stuck opening it gets an empty
    file, so a regression fails its asserts instead of hanging the suite."""
    done = threading.Event()

    def release() -> None:
        while not done.wait(every):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting
                pass

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("glob", [False, True])
def test_fifo_and_symlinks_in_a_source_are_counted_not_read(glob, tmp_path, tiny_tokenizer):
    src = _src(tmp_path)
    os.mkfifo(src / "pipe.txt")
    (src / "dangling.txt").symlink_to(src / "gone.txt")
    (src / "loop1").symlink_to(src / "loop2")
    (src / "loop2").symlink_to(src / "loop1")
    (src / "link.txt").symlink_to(src / "good0.txt")
    spec = str(src / "*") if glob else str(src)
    with _unblock_fifo(src / "pipe.txt"):
        result = _invoke("build", "fifo", "--source", spec, "--tokenizer", str(tiny_tokenizer),
                         "--seq-len", "16", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["skipped"]["counts"] == {
        "not-regular-file": 1, "dangling-symlink": 1, "symlink-loop": 2, "symlink": 1}
    assert sum(s["documents"] for s in manifest["splits"].values()) == 6
    table = _invoke("info", "fifo").stdout
    assert "not-regular-file" in table and "dangling-symlink" in table and "symlink-loop" in table


def test_a_fifo_or_link_named_directly(tmp_path, tiny_tokenizer):
    src = _src(tmp_path, 1)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.txt").symlink_to(src / "good0.txt")
    with _unblock_fifo(tmp_path / "pipe"):
        result = _build("pipe", tmp_path / "pipe", tiny_tokenizer)
    assert result.exit_code == 2 and "not a regular file" in result.output
    if split_of("file:link.txt") == "train":  # a file named through its link is read
        assert _build("link", tmp_path / "link.txt", tiny_tokenizer).exit_code == 0


SIGTERM_CHILD = """
import os, signal
from cir.data import sources

real = sources.read_text

def read_then_term(path, opts):  # SIGTERM in the middle of the build, at the first file
    os.kill(os.getpid(), signal.SIGTERM)
    return real(path, opts)

sources.read_text = read_then_term
from cir.cli.main import app
app()
"""


def test_sigterm_during_build_leaves_no_temp_folder(tmp_path, tiny_tokenizer):
    src = _src(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_CHILD, "data", "build", "term", "--source", str(src),
         "--tokenizer", str(tiny_tokenizer), "--seq-len", "16"],
        env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(datasets_dir().iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_tokens_below_one_is_refused(value, tmp_path, tiny_tokenizer):
    result = _build("tiny", _src(tmp_path), tiny_tokenizer, "--max-tokens", value)
    assert result.exit_code == 2 and "--max-tokens must be >= 1" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (datasets_dir() / "tiny").exists()
    with pytest.raises(ValueError, match="max-tokens"):
        build_dataset(tmp_path / "ds", str(tmp_path / "src"), tokenizer=tiny_tokenizer, max_tokens=int(value))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("some.py", b"print('not a tokenizer')\n", "{}: not a tokenizer.json"),
    ("blob.bin", bytes(range(256)), "{}: not a tokenizer.json"),
    ("list.json", b"[1, 2]", "{}: not a tokenizer.json"),
    ("gone.json", None, "no tokenizer at {}"),
])
def test_a_tokenizer_that_is_not_one_is_named(name, content, message, tmp_path):
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    result = _build("tiny", _src(tmp_path), bad, "--json")
    assert result.exit_code == 2 and message.format(bad) in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (datasets_dir() / "tiny").exists()


def test_an_unreachable_hf_dataset_is_one_quiet_line(monkeypatch):
    import datasets

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def offline_load(path, *args, **kwargs):  # as datasets fails after its retries
        noisy.append(logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    noisy: list[bool] = []
    level = logging.getLogger("huggingface_hub").level
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no network: fails before loading
    result = _invoke("build", "x", "--source", "hf:nobody/nothing", "--json")
    assert result.exit_code == 2 and "Couldn't reach 'nobody/nothing'" in result.stderr
    assert "does not resolve" in result.stderr and noisy == []
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the libraries fail fast
    result = _invoke("build", "x", "--source", "hf:nobody/nothing", "--json")
    assert result.exit_code == 2 and "Couldn't reach 'nobody/nothing'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and noisy == [False]
    assert logging.getLogger("huggingface_hub").level == level  # restored


def test_a_streamed_hf_dataset_is_quiet_while_it_reads(monkeypatch):
    """Streaming opens and reads the files as rows are taken, after ``load_dataset``: the
    retry warnings stay silenced then too."""
    import datasets

    def stream(path, *args, **kwargs):  # lazy, as an IterableDataset
        for k in range(2):
            noisy.extend(logging.getLogger(name).isEnabledFor(logging.WARNING)
                         for name in ("datasets.utils.file_utils", "huggingface_hub.utils._http"))
            yield {"text": f"row {k} of a dataset streamed from the Hub"}
        raise ConnectionError("Server Disconnected")  # as datasets fails after its retries

    noisy: list[bool] = []
    level = logging.getLogger("datasets").level
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # the host resolves
    monkeypatch.setattr(datasets, "load_dataset", stream)
    result = _invoke("build", "x", "--source", "hf:nobody/nothing", "--json")
    assert result.exit_code == 2 and "Server Disconnected" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert noisy == [False] * 4 and logging.getLogger("datasets").level == level


def test_show_checks_n_and_says_when_a_split_is_empty(tmp_path, tiny_tokenizer):
    name = next(f"doc{i}.txt" for i in range(100) if split_of(f"file:doc{i}.txt") == "train")
    (tmp_path / name).write_text("hello world, one small train document\n" * 20)
    assert _build("one", tmp_path / name, tiny_tokenizer).exit_code == 0
    bad = _invoke("show", "one", "--split", "train", "-n", "-1")
    assert bad.exit_code == 2 and "-n" in bad.output and "negative dimensions" not in bad.output
    empty = _invoke("show", "one", "--split", "val")
    assert empty.exit_code == 0 and empty.stdout == ""
    assert "val split of one is empty" in empty.stderr
    assert json.loads(_invoke("show", "one", "--split", "val", "--json").stdout) == []


@pytest.mark.parametrize("command", ["info", "show"])
def test_random_is_explained_not_listed_as_available(command):
    result = _invoke(command, "random")
    assert result.exit_code == 2
    assert "uniform random-token evaluation set" in result.output and "available" not in result.output
