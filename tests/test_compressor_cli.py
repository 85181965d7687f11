"""Compressor on the shared tiny datasets: library training and the CLI (train, resume, eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cir.cli.main import app
from cir.compressor.train import default_train_config, train_compressor
from typer.testing import CliRunner

from cir.checkpoint import load_checkpoint
from cir.train import lr_at


def test_train_on_tiny_dataset(tiny_dataset, tmp_path):
    logs: list[dict] = []
    cfg = default_train_config("debug", steps=60, device="cpu")
    result = train_compressor(str(tiny_dataset), tmp_path / "c", preset="debug", train_cfg=cfg,
                              on_log=logs.append)
    losses = [r["loss"] for r in logs if r["event"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0
    model = load_checkpoint(tmp_path / "c")
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert model.config.vocab_size == manifest["vocab_size"]  # follows the dataset
    assert model.config.seq_len == manifest["seq_len"]
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (
        tiny_dataset / "tokenizer.json").read_bytes()
    assert result.step == 60


def _invoke(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_cli_train_resume_eval(tiny_dataset, tiny_prose_dataset, tmp_path):
    out = str(tmp_path / "ck")
    common = ["compressor", "train", "--data", str(tiny_dataset), "--out", out,
              "--preset", "debug", "--device", "cpu", "--json"]
    first = _invoke(*common, "--steps", "300")
    assert first["step"] == 300 and first["resumed_from"] == 0
    again = _invoke(*common, "--steps", "300")  # same command: resumes, nothing left to do
    assert again["resumed_from"] == 300 and again["step"] == 300
    ev = _invoke("compressor", "eval", out, "--data", str(tiny_dataset), "--data",
                 str(tiny_prose_dataset), "--data", "random", "--split", "train", "--json")
    rows = {r["name"]: r for r in ev["rows"]}
    code, prose, rnd = (rows[str(tiny_dataset)], rows[str(tiny_prose_dataset)], rows["random"])
    assert rnd["tra"] < 0.05 < code["tra"]
    assert rnd["tra"] < prose["tra"] < code["tra"]
    # both OOD sets are far above in-domain; between them a 300-step debug model has no
    # reliable order of losses (prose ~ random, either side by a few tenths of a nat)
    assert code["loss"] < min(prose["loss"], rnd["loss"]) - 3.0
    assert set(ev["auroc_vs_first"]) == {str(tiny_prose_dataset), "random"}
    assert ev["auroc_vs_first"]["random"] > 0.99
    # the unigram baseline, fitted on the in-domain train split, scored on the same chunks
    assert set(ev["unigram_auroc_vs_first"]) == {str(tiny_prose_dataset), "random"}
    assert ev["unigram_auroc_vs_first"]["random"] > 0.9
    bare = _invoke("compressor", "eval", out, "--data", str(tiny_dataset), "--data", "random",
                   "--split", "train", "--no-baseline", "--json")
    assert bare["unigram_auroc_vs_first"] is None
    assert bare["auroc_vs_first"]["random"] == ev["auroc_vs_first"]["random"]


def test_cli_eval_markdown(tiny_dataset, tmp_path):
    from cir.compressor.model import Compressor, CompressorConfig

    from cir.checkpoint import save_checkpoint

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    model = Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"]))
    save_checkpoint(tmp_path / "m", model)
    res = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data",
                                   str(tiny_dataset), "--split", "train", "--markdown",
                                   "--max-chunks", "5"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("| dataset |") and len(lines) == 3 and "| 5 |" in lines[2]
    both = [_invoke("compressor", "eval", str(tmp_path / "m"), "--data", str(tiny_dataset),
                    "--split", "train", "--max-chunks", "5", "--json", *extra)
            for extra in ([], ["--precision", "fp32"])]
    assert both[0]["rows"] == both[1]["rows"]  # auto is fp32 on CPU
    bad = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data",
                                   str(tiny_dataset), "--precision", "fp16"])
    assert bad.exit_code != 0 and "--precision must be auto, fp32 or bf16" in bad.output


def test_cli_eval_scores_codes_by_search_or_by_the_encoders_pick(tiny_dataset, tmp_path):
    """`compressor eval --codes`: a coded model's rows under each chunk's best code
    (default) or its encoder's pick, each equal to ``Compressor.score`` under that rule;
    a bad value is a one-line error."""
    import torch
    from cir.compressor.model import Compressor, CompressorConfig
    from cir.data.shards import open_dataset

    from cir.checkpoint import save_checkpoint

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"], n_codes=4))
    with torch.no_grad():
        model.code_bias.normal_()
    save_checkpoint(tmp_path / "m", model)
    rows = {}
    for codes in ("best", "encoder"):
        ev = _invoke("compressor", "eval", str(tmp_path / "m"), "--data", str(tiny_dataset),
                     "--split", "train", "--codes", codes, "--no-baseline", "--json")
        rows[codes] = ev["rows"][0]
    data = open_dataset(tiny_dataset, "train")
    ids, mask = data.get_batch(np.arange(len(data)))
    for codes, row in rows.items():
        s = model.score(ids, mask, codes=codes)
        want = float((s.loss * s.n_tokens).sum() / s.n_tokens.sum())
        assert row["loss"] == pytest.approx(want, rel=1e-5)
    assert rows["best"]["loss"] < rows["encoder"]["loss"]
    bad = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data",
                                   str(tiny_dataset), "--codes", "nearest"])
    assert bad.exit_code == 2 and "--codes must be best or encoder" in bad.output


def test_cli_eval_ood_split_all(tiny_dataset, tiny_prose_dataset, tmp_path):
    """--ood-split all scores every chunk of the corpora after the first; the in-domain one
    keeps --split, `random` its test draw, and --split all is refused."""
    from cir.compressor.model import Compressor, CompressorConfig
    from cir.data.shards import open_dataset

    from cir.checkpoint import save_checkpoint

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    save_checkpoint(tmp_path / "m", Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"])))
    ev = _invoke("compressor", "eval", str(tmp_path / "m"), "--data", str(tiny_dataset),
                 "--data", str(tiny_prose_dataset), "--data", "random", "--ood-split", "all",
                 "--json")
    chunks = {r["name"]: r["chunks"] for r in ev["rows"]}
    assert chunks[str(tiny_dataset)] == len(open_dataset(tiny_dataset, "test"))
    assert chunks[str(tiny_prose_dataset)] == len(open_dataset(tiny_prose_dataset, "all")) > len(
        open_dataset(tiny_prose_dataset, "test"))
    assert chunks["random"] == 1024 and (ev["split"], ev["ood_split"]) == ("test", "all")
    bad = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data",
                                   str(tiny_dataset), "--split", "all"])
    assert bad.exit_code != 0 and "--ood-split all" in bad.output


def test_cli_train_wsd_schedule(tiny_dataset, tmp_path):
    out = tmp_path / "wsd"
    _invoke("compressor", "train", "--data", str(tiny_dataset), "--out", str(out), "--preset",
            "debug", "--device", "cpu", "--steps", "20", "--schedule", "wsd", "--json")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in logs if r["event"] == "train"}
    peak = default_train_config("debug").lr
    assert lr[10] == lr[15] == peak > lr[20]  # constant, then the decay over the last 4 steps
    bad = CliRunner().invoke(app, ["compressor", "train", "--data", str(tiny_dataset), "--out",
                                   str(tmp_path / "bad"), "--preset", "debug", "--schedule",
                                   "step"])
    assert bad.exit_code != 0 and "schedule must be cosine or wsd" in bad.output


def test_cli_train_init_from(tiny_dataset, tmp_path):
    """--init-from: the weights of another run, its step, a fresh optimizer, re-warmed lr."""
    help_text = CliRunner().invoke(app, ["compressor", "train", "--help"]).output
    assert "--init-from" in help_text and "re-warmed" in help_text
    common = ["compressor", "train", "--data", str(tiny_dataset), "--preset", "debug",
              "--device", "cpu", "--json"]
    _invoke(*common, "--out", str(tmp_path / "src"), "--steps", "10")
    res = _invoke(*common, "--out", str(tmp_path / "dst"), "--steps", "14",
                  "--init-from", str(tmp_path / "src"))
    assert res["resumed_from"] == 10 and res["step"] == 14
    logs = [json.loads(line) for line in (tmp_path / "dst" / "metrics.jsonl").read_text().splitlines()]
    assert (logs[0]["event"], logs[0]["step"]) == ("warm_start", 10)
    last = next(r for r in logs if r["event"] == "train")
    cfg = default_train_config("debug", steps=14)
    assert last["step"] == 14 and last["lr"] == lr_at(13, cfg) * 4 / 5  # warmup_steps 5
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "bad"), "--steps", "14",
                                   "--init-from", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_cli_train_decay_steps_resumes_the_decay(tiny_dataset, tmp_path):
    """--decay-steps finishes a wsd run from where it stands; re-run, it resumes that decay."""
    common = ["compressor", "train", "--data", str(tiny_dataset), "--preset", "debug",
              "--device", "cpu", "--json", "--out", str(tmp_path / "r")]
    # the wall budget is checked at log steps (every 5 for debug): each call stops at one
    _invoke(*common, "--steps", "1000", "--schedule", "wsd", "--max-minutes", "1e-9")  # 5
    first = _invoke(*common, "--decay-steps", "8", "--max-minutes", "1e-9")  # 5 -> 10 of 13
    again = _invoke(*common, "--decay-steps", "8")
    assert (first["resumed_from"], first["step"], again["step"]) == (5, 10, 13)
    logs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in logs if r["event"] == "train"}
    cfg = default_train_config("debug", steps=13, schedule="wsd", decay_frac=8 / 13)
    assert lr[5] == cfg.lr and lr[13] == pytest.approx(lr_at(12, cfg))  # one decay, 5 -> 13
    assert lr[10] == pytest.approx(lr_at(9, cfg)) and lr[13] < lr[10] < cfg.lr
    for extra, message in ((["--steps", "5"], "replaces --steps"),
                           (["--schedule", "cosine"], "needs --schedule wsd"),
                           (["--constant-steps", "3"], "must be > 0")):
        bad = CliRunner().invoke(app, [*common, "--decay-steps", "0" if extra[0] ==
                                       "--constant-steps" else "4", *extra])
        assert bad.exit_code != 0 and message in bad.output


def test_cli_eval_worst_documents(tiny_dataset, tmp_path):
    """--worst N: each dataset's N lowest-TRA documents (ids from its document index), in
    JSON, the rich table and Markdown; `random` has no documents to name."""
    from cir.compressor.model import Compressor, CompressorConfig
    from cir.data.shards import open_dataset

    from cir.checkpoint import save_checkpoint

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    save_checkpoint(tmp_path / "m", Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"])))
    args = ["compressor", "eval", str(tmp_path / "m"), "--data", str(tiny_dataset), "--data",
            "random", "--split", "train", "--worst", "3"]
    ev = _invoke(*args, "--json")
    docs = ev["documents"][str(tiny_dataset)]
    index = open_dataset(tiny_dataset, "train").documents()
    assert docs["documents"] == len(index) and len(docs["worst"]) == 3
    assert all(w["id"] in index.ids for w in docs["worst"])
    tras = [w["tra"] for w in docs["worst"]]
    assert tras == sorted(tras) and tras[0] <= docs["tra_document_mean"]
    assert ev["documents"]["random"] is None
    assert "documents" not in _invoke(*args[:-2], "--json")  # only when asked
    rich = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    shown = " ".join(rich.stdout.split())  # a table title wraps at the table's width
    assert rich.exit_code == 0 and "3 lowest-TRA of" in shown
    assert "random: no document index" in shown
    by_errors = _invoke(*args, "--worst-by", "errors", "--json")["documents"][str(tiny_dataset)]
    wrong = [round(w["tokens"] * (1 - w["tra"])) for w in by_errors["worst"]]
    assert by_errors["by"] == "errors" and wrong == sorted(wrong, reverse=True)
    assert by_errors["worst_error_share"] >= docs["worst_error_share"]
    bad = CliRunner().invoke(app, [*args, "--worst-by", "loss"])
    assert bad.exit_code != 0 and "--worst-by must be tra or errors" in bad.output
    md = CliRunner().invoke(app, [*args, "--markdown"])
    assert md.exit_code == 0 and md.stdout.count(f"| {docs['worst'][0]['id']} |") == 1


def test_cli_eval_worst_with_a_broken_index_fails_before_scoring(tiny_dataset, tmp_path):
    import shutil

    from cir.compressor.model import Compressor, CompressorConfig

    from cir.checkpoint import save_checkpoint

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "test.docs.jsonl").write_text('{"id": "file:a.py", "chunks": 1}\n')  # too few
    manifest = json.loads((data / "manifest.json").read_text())
    save_checkpoint(tmp_path / "m", Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"])))
    res = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data", str(data),
                                   "--worst", "2", "--no-baseline"])
    assert res.exit_code != 0 and "test.docs.jsonl: indexes 1 chunks" in res.output
    assert "score" not in res.output  # failed before the scoring progress started
    ok = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data", str(data),
                                  "--no-baseline", "--json"])
    assert ok.exit_code == 0  # without --worst the index is not read


def test_cli_eval_unseen_below(tiny_tokenizer, tmp_path):
    """--unseen-below: the in-domain row again over only the held-out documents mostly
    unseen in training; a test copy of a training file is left out of it."""
    from cir.compressor.model import Compressor, CompressorConfig
    from cir.data.shards import build_dataset, open_dataset
    from cir.data.split import split_of

    from cir.checkpoint import save_checkpoint

    def name_in(split: str, stem: str) -> str:
        k = 0
        while split_of(f"file:{stem}{k}.py") != split:
            k += 1
        return f"{stem}{k}.py"

    src = tmp_path / "src"
    src.mkdir()
    body = "".join(f"def fetch_{i}(store, key={i}):\n    return store.get(key)\n" for i in range(40))
    (src / name_in("train", "original")).write_text(body)
    (src / name_in("test", "copy")).write_text(body + "# copied\n")
    (src / name_in("test", "own")).write_text("".join(f"class Item{i}:\n    size = {i * 3 % 7}\n" for i in range(60)))
    build_dataset(tmp_path / "ds", str(src), tokenizer=tiny_tokenizer, seq_len=64)
    save_checkpoint(tmp_path / "m", Compressor(CompressorConfig.from_name("debug", vocab_size=512, seq_len=64)))
    args = ["compressor", "eval", str(tmp_path / "m"), "--data", str(tmp_path / "ds"), "--data", "random"]
    ev = _invoke(*args, "--unseen-below", "0.5", "--json")
    index = open_dataset(tmp_path / "ds", "test").documents()
    own = index.ids.index(f"file:{name_in('test', 'own')}")
    assert ev["unseen_below"] == {"threshold": 0.5, "n": 16, "row": f"{tmp_path / 'ds'}, < 50% seen",
                                  "documents": 1, "of": 2}
    first, unseen, rnd = ev["rows"]
    assert unseen["name"] == ev["unseen_below"]["row"] and rnd["name"] == "random"
    assert unseen["chunks"] == int(index.starts[own + 1] - index.starts[own]) < first["chunks"]
    assert set(ev["auroc_vs_first"]) == {"random"}  # the restricted row is no out-of-domain set
    rich = CliRunner().invoke(app, [*args, "--unseen-below", "0.5"], env={"COLUMNS": "200"})
    assert rich.exit_code == 0 and "the 1 of 2 documents with less than 50%" in " ".join(rich.stdout.split())
    bad = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path / "m"), "--data", "random",
                                   "--unseen-below", "0.5"])
    assert bad.exit_code != 0 and "needs a document index on random" in bad.output


def test_cli_train_with_muon(tiny_dataset, tmp_path):
    import torch

    out = tmp_path / "muon"
    args = ["compressor", "train", "--data", str(tiny_dataset), "--out", str(out), "--preset",
            "debug", "--device", "cpu", "--steps", "20", "--optimizer", "muon", "--json"]
    _invoke(*args)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert json.loads(state["train_config"])["optimizer"] == "muon"
    assert set(state["optimizer"]) == {"muon", "adamw"}
    assert state["optimizer"]["muon"]["state"]  # momentum buffers of the Linear weights
    again = CliRunner().invoke(app, [*args[:-2], "adamw"])  # the same run, other optimizer
    assert again.exit_code != 0 and "optimizer" in again.output
