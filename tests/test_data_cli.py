"""`route-cli data build | info | sources | list` through typer's CliRunner."""

from __future__ import annotations

import json
import shutil

import pytest
from cir.cli.main import app
from cir.data.shards import open_dataset
from typer.testing import CliRunner

from cir.paths import datasets_dir

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, ["data", *args])
    return result


def test_build_and_info_json(tiny_corpus, tiny_tokenizer):
    result = _invoke("build", "code", "--source", str(tiny_corpus / "code"), "--tokenizer", str(tiny_tokenizer),
                     "--seq-len", "32", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["seq_len"] == 32 and manifest["path"] == str(datasets_dir() / "code")
    assert len(open_dataset("code", "train")) == manifest["splits"]["train"]["chunks"]

    result = _invoke("info", "code", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["splits"] == {k: {**v, **{x: info["splits"][k][x] for x in ("bytes_per_token", "fill")}}
                              for k, v in manifest["splits"].items()}
    train = info["splits"]["train"]
    assert train["bytes_per_token"] == train["bytes"] / train["tokens"]
    def wide_info() -> str:  # the line holds a tmp path: no wrapping inside the phrase
        return " ".join(runner.invoke(app, ["data", "info", "code"], env={"COLUMNS": "400"}).stdout.split())

    assert info["document_index"] is True and "no document index" not in wide_info()
    (datasets_dir() / "code" / "val.docs.jsonl").rename(datasets_dir() / "val.docs.jsonl")
    assert json.loads(_invoke("info", "code", "--json").stdout)["document_index"] is False
    assert "no document index: rebuild for one" in wide_info()
    (datasets_dir() / "val.docs.jsonl").rename(datasets_dir() / "code" / "val.docs.jsonl")

    listed = json.loads(_invoke("list", "--json").stdout)
    assert listed == ["code"]

    shown = json.loads(_invoke("show", "code", "--split", "train", "-n", "2", "--json").stdout)
    sources = [p.read_text() for p in (tiny_corpus / "code").rglob("*.py")]
    assert len(shown) == 2 and all(len(c["text"]) > 0 and any(c["text"] in s for s in sources) for c in shown)
    for c in shown:  # each chunk names the file it came from
        assert c["document"].startswith("file:")
        assert c["text"] in (tiny_corpus / "code" / c["document"].removeprefix("file:")).read_text()
    one = _invoke("show", "code", "-n", "1")
    assert one.exit_code == 0 and " of file:" in one.stdout


def test_build_trains_tokenizer_and_renders_tables(tiny_corpus, tmp_path):
    out = tmp_path / "prose-ds"
    result = _invoke("build", "prose", "--source", str(tiny_corpus / "prose"), "--vocab-size", "300",
                     "--seq-len", "32", "--pack", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.stdout and "train" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["pack"] is True
    result = _invoke("info", str(out))
    assert result.exit_code == 0 and "held-out" in result.stdout
    again = _invoke("build", "prose", "--source", str(tiny_corpus / "prose"), "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output


def test_skipped_files_shown_and_strict(tmp_path, tiny_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):  # some land in train whatever the hash
        (src / f"good{i}.txt").write_text(f"hello world, small good file {i}\n" * 20)
    (src / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = _invoke("build", "mixed", "--source", str(src), "--tokenizer", str(tiny_tokenizer), "--seq-len", "16")
    assert result.exit_code == 0, result.output
    assert "non-utf8" in result.stdout
    info = json.loads(_invoke("info", "mixed", "--json").stdout)
    assert info["skipped"]["counts"] == {"non-utf8": 1}
    strict = _invoke("build", "strict", "--source", str(src), "--tokenizer", str(tiny_tokenizer), "--strict")
    assert strict.exit_code == 2 and "bad.txt" in strict.output
    assert not (datasets_dir() / "strict").exists()


def test_sources_and_errors():
    result = _invoke("sources", "--json")
    assert result.exit_code == 0
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"python-code", "python-docs", "c-code", "man-pages", "random"} <= names
    assert "present" in _invoke("sources").stdout
    bad = _invoke("build", "x", "--source", "no-such-source")
    assert bad.exit_code == 2 and "python-code" in bad.output and "Traceback" not in bad.output
    missing = _invoke("info", "nothing-here")
    assert missing.exit_code == 2 and "no dataset" in missing.output


def test_help_has_examples():
    for command in ("build", "info", "show", "sources", "list"):
        result = _invoke(command, "--help")
        assert result.exit_code == 0 and "Example: route-cli data" in result.stdout


def test_info_lists_damaged_shards_and_exits_1(tiny_dataset):
    root = shutil.copytree(tiny_dataset, datasets_dir() / "broken")
    assert _invoke("info", "broken").exit_code == 0
    (root / "val.bin").unlink()
    result = _invoke("info", "broken")
    assert result.exit_code == 1, result.output
    assert "held-out" in result.stdout  # the figures still show
    assert "damaged:" in result.stderr and "val.bin: missing; rebuild the dataset" in result.stderr
    result = _invoke("info", "broken", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["damaged"] == [f"{root / 'val.bin'}: missing"]


def test_info_names_a_broken_manifest(tiny_dataset):
    root = shutil.copytree(tiny_dataset, datasets_dir() / "torn")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[:100])
    for command in ("info", "show"):
        result = _invoke(command, "torn")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "manifest.json: not a dataset manifest" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "rebuild" in result.stderr


def test_build_warns_of_empty_held_out_splits_and_keeps_its_name(tmp_path, tiny_tokenizer):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.txt").write_text("a single small document, hashed into train\n")
    out = tmp_path / "other" / "place"
    result = _invoke("build", "mine", "--source", str(src), "--tokenizer", str(tiny_tokenizer),
                     "--seq-len", "16", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "mine" and len(manifest["warnings"]) == 2
    assert "warning:" in result.stderr and "val split has no documents" in result.stderr
    assert "test split has no documents" in result.stderr
    table = _invoke("info", str(out))
    assert table.exit_code == 0 and table.stdout.startswith("mine ")
    assert "val split has no documents" in table.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_max_file_mb_must_be_positive_and_finite(tmp_path, tiny_tokenizer, value):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text\n")
    result = _invoke("build", "sized", "--source", str(src), "--tokenizer", str(tiny_tokenizer),
                     f"--max-file-mb={value}")
    assert result.exit_code == 2, result.output
    assert "--max-file-mb must be > 0 and finite" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (datasets_dir() / "sized").exists()
