"""Compressor training, resuming, evaluation, benchmark and CLI (debug preset, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _toy import PaddedChunks
from cir.cli.main import app
from cir.compressor.bench import bench_scoring, bench_training
from cir.compressor.evaluate import auroc, auroc_table, evaluate, rows_to_markdown
from cir.compressor.model import Compressor
from cir.compressor.train import default_train_config, train_compressor
from safetensors.torch import load_file
from typer.testing import CliRunner

from cir.checkpoint import load_checkpoint


class Chunks(PaddedChunks):
    """In-memory chunks with a learnable structure: each chunk cycles through a short
    random motif of token ids; lengths vary so the tail is padding."""

    def __init__(self, n: int, seq_len: int = 32, vocab: int = 512, seed: int = 0,
                 uniform: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.seq_len, self.vocab_size = seq_len, vocab
        if uniform:
            self.ids = rng.integers(2, vocab, size=(n, seq_len))
        else:
            motifs = rng.integers(2, 20, size=(n, 2))  # a small sub-vocabulary
            self.ids = motifs[:, np.arange(seq_len) % 2]
        self.lengths = rng.integers(seq_len // 2, seq_len + 1, size=n)


def _cfg(**kw):
    return default_train_config("debug", **{"steps": 40, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    logs: list[dict] = []
    result = train_compressor(Chunks(256), out, preset="debug", train_cfg=_cfg(steps=800),
                              on_log=logs.append)
    return out, result, logs


def test_train_decreases_loss(trained):
    out, result, logs = trained
    losses = [r["loss"] for r in logs if r["event"] == "train"]
    assert result.step == 800 and len(losses) > 3
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2])
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    assert isinstance(load_checkpoint(out), Compressor)


def test_resume_equals_uninterrupted(tmp_path):
    # sampled-position loss and validation (at the kill too) must not break bit-identity
    data, val = Chunks(64, seed=3), Chunks(16, seed=4)
    kw = dict(preset="debug", val_data=val, loss_fraction=0.5)
    full = train_compressor(data, tmp_path / "full", train_cfg=_cfg(steps=30), **kw)
    first = train_compressor(data, tmp_path / "cut", train_cfg=_cfg(steps=30), stop_at=13,
                             **kw)  # killed after step 13 (checkpoint at 13)
    assert first.step == 13
    second = train_compressor(data, tmp_path / "cut", train_cfg=_cfg(steps=30), **kw)
    assert second.resumed_from == 13 and second.step == full.step == 30
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_in_domain_vs_random(trained):
    out, _, _ = trained
    sets = {"id": Chunks(64, seed=9), "random": Chunks(64, seed=9, uniform=True)}
    rows = evaluate(out, sets, batch_size=16, max_chunks=48)
    id_row, rnd = rows
    assert [r.name for r in rows] == ["id", "random"] and id_row.chunks == 48
    # random ids hit the 19-token motif vocabulary 3.7% of the time: at most that much
    assert rnd.tra < 0.04 < 0.5 < id_row.tra and rnd.loss > id_row.loss + 5
    assert id_row.tokens == int(sum(Chunks(64, seed=9).lengths[np.unique(
        np.linspace(0, 63, 48).round().astype(int))]))
    assert len(id_row.chunk_tra) == len(id_row.chunk_loss) == 48
    assert auroc(id_row, rnd) > 0.99
    assert auroc_table(rows) == {"random": auroc(id_row, rnd)}
    md = rows_to_markdown(rows, auroc_table(rows))
    assert md.count("\n") == 3 and "| random |" in md


def test_auroc_matches_rank_definition():
    from cir.compressor.evaluate import EvalRow

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 30), rng.normal(1, 1, 20)
    ra = EvalRow("a", 30, 0, 0, 0, 0, chunk_loss=a)
    rb = EvalRow("b", 20, 0, 0, 0, 0, chunk_loss=b)
    naive = np.mean([[float(y > x) + 0.5 * float(y == x) for x in a] for y in b])
    assert auroc(ra, rb) == pytest.approx(naive)


def test_unigram_baseline_matches_counts_and_aligns_with_rows(trained):
    from cir.compressor.evaluate import unigram_auroc_table, unigram_chunk_loss, unigram_logprobs

    train = Chunks(40, seed=3)
    ids, mask = train.get_batch(np.arange(40))
    counts = np.bincount(ids[mask].numpy(), minlength=512) + 1.0
    logp = unigram_logprobs(train, 512, batch=7)  # batching must not matter
    np.testing.assert_allclose(logp, np.log(counts / counts.sum()))
    data = Chunks(30, seed=4)
    data.lengths[[2, 5]] = 0  # empty chunks are dropped, as evaluate() drops them
    got = unigram_chunk_loss(logp, data, max_chunks=20, batch=6)
    idx = [i for i in np.unique(np.linspace(0, 29, 20).round().astype(int)) if data.lengths[i]]
    want = [-logp[data.ids[i, : data.lengths[i]]].mean() for i in idx]
    np.testing.assert_allclose(got, want)
    out, _, _ = trained
    sets = {"id": Chunks(64, seed=9), "random": Chunks(64, seed=9, uniform=True)}
    rows = evaluate(out, sets, batch_size=16, max_chunks=48)
    base = unigram_auroc_table(rows, sets, Chunks(256), 512, max_chunks=48)
    # the motif tokens are frequent in training and random tokens mostly are not
    assert set(base) == {"random"} and base["random"] > 0.99
    md = rows_to_markdown(rows, auroc_table(rows), base)
    assert "AUROC unigram" in md and md.splitlines()[-1].count("|") == 9


def test_bench_reports_throughput():
    r = bench_scoring("debug", batch_size=4, repeats=2, warmup=1)
    assert r.params > 0 and r.tokens_per_s > 0 and r.random_weights
    assert r.tokens_per_s == pytest.approx(4 * r.seq_len / r.median_s)


def test_bench_training_reports_a_training_step():
    r = bench_training("debug", batch_size=4, repeats=2, warmup=1, optimizer="muon")
    assert (r.batch_size, r.seq_len, r.optimizer, r.compile) == (4, 32, "muon", "off")
    assert r.tokens_per_s == pytest.approx(4 * r.seq_len / r.median_s)
    assert r.mfu is None and r.peak_memory_gib is None  # CUDA only
    # the preset's own loss fraction unless one is given
    assert bench_training("small", batch_size=1, repeats=1, warmup=0,
                          n_enc_layers=1, n_dec_layers=1).loss_fraction == 0.25
    with pytest.raises(ValueError, match="compile must be one of"):
        bench_training("debug", compile="fast")


def test_cli_bench_training_json():
    res = CliRunner().invoke(app, ["bench", "compressor-train", "--preset", "debug",
                                   "--repeats", "1", "--warmup", "0", "--batch-size", "2",
                                   "--optimizer", "adamw", "--optimizer", "muon", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["optimizer"] for r in out] == ["adamw", "muon"] and out[0]["tokens_per_s"] > 0
    coded = CliRunner().invoke(app, ["bench", "compressor-train", "--preset", "debug",
                                     "--repeats", "1", "--warmup", "0", "--batch-size", "2",
                                     "--set", "n_codes=4", "--json"])
    assert coded.exit_code == 0, coded.output
    # the codes' parameters: a [4, L, D] codebook, a [L * D, 4] head, a [4, V] output shift
    assert json.loads(coded.stdout)[0]["params"] == out[0]["params"] + 4 * (4 * 32 + 4 * 32 + 512)


def test_cli_bench_json():
    res = CliRunner().invoke(app, ["bench", "compressor", "--preset", "debug", "--repeats", "1",
                                   "--batch-size", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out[0]["preset"] == "debug" and out[0]["tokens_per_s"] > 0


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["bench", "compressor", "--preset", "nope", "--json"])
    assert res.exit_code == 2 and "valid: debug, small, base, paper" in res.output
    res = CliRunner().invoke(app, ["compressor", "eval", str(tmp_path), "--data", "x"])
    assert res.exit_code == 2 and "not a checkpoint directory" in res.output


def test_paper_defaults_are_the_measured_recipe():
    """The `paper` preset trains as the GPU runs did: wsd, 5e-4 after 300 warmup steps."""
    from cir.compressor.train import default_train_config

    from cir.train import lr_at

    cfg = default_train_config("paper")
    assert (cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.batch_size) == ("wsd", 5e-4, 300, 64)
    assert lr_at(300, cfg) == lr_at(cfg.steps * 8 // 10, cfg) == 5e-4  # constant phase
    assert lr_at(cfg.steps, cfg) < lr_at(cfg.steps * 9 // 10, cfg) < 5e-4  # the decay
    assert default_train_config("paper", schedule="cosine").schedule == "cosine"


def test_document_errors_match_a_per_document_reference(trained):
    """Worst documents from evaluate()'s rows equal a loop over each document's own chunks,
    with a subsample (max_chunks) and chunks without tokens in the mix."""
    from cir.compressor.evaluate import document_errors
    from cir.data.shards import DocumentIndex

    out, _, _ = trained
    model = load_checkpoint(out)
    data = Chunks(60, seed=5)
    data.ids[40:] = np.random.default_rng(1).integers(2, 512, size=(20, 32))  # hard documents
    data.lengths[[3, 41]] = 0
    sizes = [5, 1, 9, 0, 12, 3, 10, 20]  # one document without chunks
    index = DocumentIndex([f"doc{i}" for i in range(len(sizes))], np.cumsum([0, *sizes]))
    data.documents = lambda: index
    (row,) = evaluate(model, {"d": data}, max_chunks=45)
    got = document_errors(row, data, worst=3)
    picked = [i for i in np.unique(np.linspace(0, 59, 45).round().astype(int)) if data.lengths[i]]
    ids, mask = data.get_batch(np.array(picked))
    s = model.score(ids, mask)
    per_doc: dict[int, list[float]] = {}
    for k, i in enumerate(picked):
        d = int(np.searchsorted(index.starts, i, side="right") - 1)
        acc = per_doc.setdefault(d, [0, 0, 0.0, 0])
        acc[0] += int(s.n_tokens[k])
        acc[1] += int(s.n_correct[k])
        acc[2] += float(s.loss[k]) * int(s.n_tokens[k])
        acc[3] += 1
    tra = {d: c / t for d, (t, c, _, _) in per_doc.items()}
    order = sorted(per_doc, key=lambda d: (tra[d], per_doc[d][1]))[:3]
    assert got["documents"] == len(per_doc) == 7
    assert [w["id"] for w in got["worst"]] == [f"doc{d}" for d in order]
    assert got["worst"][0]["id"] == "doc7"  # the random-token chunks 40-59
    for w, d in zip(got["worst"], order, strict=True):
        t, c, loss_sum, n = per_doc[d]
        assert (w["tokens"], w["chunks"]) == (t, n)
        assert w["tra"] == pytest.approx(c / t) and w["loss"] == pytest.approx(loss_sum / t, rel=1e-5)
    wrong = {d: t - c for d, (t, c, _, _) in per_doc.items()}
    assert got["worst_error_share"] == pytest.approx(sum(wrong[d] for d in order) / sum(wrong.values()))
    assert got["worst_token_share"] == pytest.approx(
        sum(per_doc[d][0] for d in order) / sum(v[0] for v in per_doc.values()))
    assert got["tra_document_mean"] == pytest.approx(np.mean(list(tra.values())))
    assert document_errors(row, Chunks(60, seed=5)) is None  # no index: nothing to say
    most = document_errors(row, data, worst=3, by="errors")
    top = sorted(wrong, key=lambda d: (-wrong[d], -per_doc[d][0]))[:3]
    assert [w["id"] for w in most["worst"]] == [f"doc{d}" for d in top]
    assert most["worst_error_share"] == pytest.approx(sum(wrong[d] for d in top) / sum(wrong.values()))
    with pytest.raises(ValueError, match="by must be one of tra, errors"):
        document_errors(row, data, by="loss")


def test_warm_start_may_change_dropout_not_the_architecture(trained, tmp_path):
    """Dropout changes how a model trains, not what its weights mean: a warm start may
    turn it on; a config that changes the weights' shapes is still refused."""
    from cir.checkpoint import CheckpointError

    out, result, _ = trained
    logs: list[dict] = []
    res = train_compressor(Chunks(256), tmp_path / "drop", preset="debug",
                           train_cfg=_cfg(steps=result.step + 20), overrides={"dropout": 0.1},
                           init_from=out, on_log=logs.append)
    assert res.resumed_from == result.step and res.step == result.step + 20
    assert logs[0]["event"] == "warm_start"
    assert load_checkpoint(tmp_path / "drop").config.dropout == 0.1
    with pytest.raises(CheckpointError, match="different model config"):
        train_compressor(Chunks(256), tmp_path / "wide", preset="debug",
                         train_cfg=_cfg(steps=result.step + 20), overrides={"d_ff": 128},
                         init_from=out)


def test_trains_on_several_datasets(tiny_dataset, tiny_prose_dataset, tiny_corpus, tiny_tokenizer, tmp_path):
    """`--data A --data B`: one run over both corpora (validated on both val splits); a
    list of one is that dataset."""
    from cir.compressor.train import _val_split, open_split

    runner = CliRunner()
    res = runner.invoke(app, ["compressor", "train", "--data", str(tiny_dataset), "--data",
                              str(tiny_prose_dataset), "--out", str(tmp_path / "both"),
                              "--preset", "debug", "--steps", "3", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["step"] == 3 and "val_loss" in json.loads(res.stdout)["last_eval"]
    pair = [str(tiny_dataset), str(tiny_prose_dataset)]
    assert len(open_split(pair, "train")) == sum(len(open_split(d, "train")) for d in pair)
    assert len(_val_split(pair)) == sum(len(open_split(d, "val")) for d in pair)
    one = train_compressor([str(tiny_dataset)], tmp_path / "one", preset="debug", train_cfg=_cfg(steps=3))
    plain = train_compressor(str(tiny_dataset), tmp_path / "plain", preset="debug", train_cfg=_cfg(steps=3))
    assert one.step == plain.step == 3
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from cir.data.shards import build_dataset

    build_dataset(tmp_path / "short", str(tiny_corpus / "prose"), tokenizer=tiny_tokenizer, seq_len=32)
    bad = runner.invoke(app, ["compressor", "train", "--data", str(tiny_dataset), "--data",
                              str(tmp_path / "short"), "--out", str(tmp_path / "bad"), "--preset", "debug"])
    assert bad.exit_code == 2 and "cannot join" in bad.output and not (tmp_path / "bad").exists()


def test_restrict_row_equals_scoring_only_those_documents(trained):
    """A row restricted to some documents has the figures of evaluating just their chunks."""
    from cir.compressor.evaluate import restrict_row
    from cir.data.shards import DocumentIndex

    model = load_checkpoint(trained[0])
    data = Chunks(40, seed=6)
    data.ids[30:] = np.random.default_rng(2).integers(2, 512, size=(10, 32))
    sizes = [10, 4, 16, 10]
    index = DocumentIndex([f"doc{i}" for i in range(4)], np.cumsum([0, *sizes]))
    data.documents = lambda: index
    (row,) = evaluate(model, {"d": data}, max_chunks=31)
    keep = np.array([True, False, True, False])
    got = restrict_row(row, data, keep, "kept")
    mine = np.concatenate([np.arange(0, 10), np.arange(14, 30)])
    picked = np.unique(np.linspace(0, 39, 31).round().astype(int))
    picked = picked[np.isin(picked, mine)]
    s = model.score(*data.get_batch(picked))
    assert (got.name, got.chunks, got.tokens) == ("kept", len(picked), int(s.n_tokens.sum()))
    assert got.tra == pytest.approx(float(s.n_correct.sum()) / int(s.n_tokens.sum()))
    assert got.loss == pytest.approx(float((s.loss * s.n_tokens).sum() / s.n_tokens.sum()), rel=1e-5)
    assert np.array_equal(got.chunk_index, picked)
    full = restrict_row(row, data, np.ones(4, bool), "all")
    assert (full.chunks, full.tokens) == (row.chunks, row.tokens) and full.tra == pytest.approx(row.tra)
    with pytest.raises(ValueError, match="the document index 4 documents"):
        restrict_row(row, data, keep[:3], "x")
    with pytest.raises(ValueError, match="no document index"):
        restrict_row(row, Chunks(40, seed=6), keep, "x")


def test_cli_refits_coded_compressors_unless_told_not_to(tiny_dataset, tmp_path):
    """A coded run ends refitted (its weights say so), `--no-refit-codes` keeps the trained
    shifts, and the refit is what `refit_codes` gives those shifts on the training chunks."""
    from cir.compressor.train import REFIT_CHUNKS, REFIT_KEY, open_split

    from cir.checkpoint import weights_metadata

    runner = CliRunner()
    base = ["compressor", "train", "--data", str(tiny_dataset), "--preset", "debug", "--steps",
            "4", "--device", "cpu", "--json", "--set", "n_codes=2", "--set", "seq_len=64"]
    for name, extra in (("fit", []), ("raw", ["--no-refit-codes"])):
        res = runner.invoke(app, [*base, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    fit_meta = weights_metadata(tmp_path / "fit" / "model.safetensors")
    assert REFIT_KEY in fit_meta
    assert REFIT_KEY not in weights_metadata(tmp_path / "raw" / "model.safetensors")
    raw, fit = load_checkpoint(tmp_path / "raw"), load_checkpoint(tmp_path / "fit")
    train = open_split(str(tiny_dataset), "train")
    ids, mask = train.get_batch(np.arange(min(len(train), REFIT_CHUNKS)))
    info = raw.refit_codes(ids, mask)
    assert json.loads(fit_meta[REFIT_KEY]) == info
    torch.testing.assert_close(raw.code_bias, fit.code_bias, rtol=0, atol=1e-5)
