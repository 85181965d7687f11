"""Analysis on real (debug) models: TRA tables against a direct computation, latents,
the latent index, routing features, and the CLI commands with ``--json``."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cir.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def _train_compressor(data: Path, out: Path) -> Path:
    from cir.compressor.train import default_train_config, train_compressor

    cfg = default_train_config("debug", steps=25, eval_every=25, ckpt_every=25, log_every=25,
                               device="cpu")
    train_compressor(str(data), out, preset="debug", train_cfg=cfg)
    return out


def _random_lm(data: Path, tokenizer: Path, out: Path, seed: int) -> Path:
    from cir.experts.registry import build_model

    from cir.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("tlinformer", "debug", vocab_size=512, seq_len=64)
    return save_checkpoint(out, model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def registry(tiny_dataset, tiny_prose_dataset, tiny_tokenizer, tmp_path_factory) -> Path:
    """A registry with a `code` and a `prose` expert (debug compressors, random LMs)."""
    from cir.router.registry import Registry

    root = tmp_path_factory.mktemp("analysis-registry")
    reg = Registry(root / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    for i, (name, data) in enumerate((("code", tiny_dataset), ("prose", tiny_prose_dataset))):
        comp = _train_compressor(data, root / f"{name}-cmp")
        lm = _random_lm(data, tiny_tokenizer, root / f"{name}-lm", seed=i)
        reg.add_expert(name, comp, lm, calibration={"threshold": 0.0},
                       meta={"dataset": str(data)})
    return reg.root


def test_tra_table_equals_a_direct_computation(registry, tiny_dataset, tiny_prose_dataset):
    from cir.data import open_dataset
    from cir.router.analysis import open_eval_dataset, table_to_csv, tra_table

    from cir.checkpoint import load_checkpoint

    model = load_checkpoint(registry / "code" / "compressor")
    sets = {"code": ("in-domain", open_dataset(str(tiny_dataset), "test")),
            "prose": ("semi-OOD", open_dataset(str(tiny_prose_dataset), "test")),
            "random": ("full-OOD", open_eval_dataset("random", "test", like=model, n_random=16))}
    rows = tra_table(model, sets, name="code")
    assert [(r.dataset, r.role) for r in rows] == [(k, v[0]) for k, v in sets.items()]
    for row, (_, data) in zip(rows, sets.values(), strict=True):
        ids, mask = data.get_batch(np.arange(len(data)))
        with torch.no_grad():
            logits = model(ids, mask)  # [N, T, V]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        correct = (logits.argmax(-1) == ids) & mask
        assert row.chunks == len(data) and row.tokens == int(mask.sum())
        assert row.tra == pytest.approx(float(correct.sum() / mask.sum()), abs=1e-6)
        per_chunk = correct.sum(1) / mask.sum(1)
        assert row.tra_chunk_mean == pytest.approx(float(per_chunk.double().mean()), abs=1e-6)
        assert row.loss == pytest.approx(float(ce[mask].double().mean()), rel=1e-4)
    assert table_to_csv(rows).count("\n") == 4
    assert rows[0].tra > rows[2].tra  # trained on code: random tokens reconstruct worse


def test_latent_index_of_a_dataset_finds_its_own_chunks(registry, tiny_dataset):
    from cir.data import load_tokenizer, open_dataset
    from cir.router.latent_index import build_index, encode_pooled

    from cir.checkpoint import load_checkpoint

    model = load_checkpoint(registry / "code" / "compressor")
    data = open_dataset(str(tiny_dataset), "train")
    tok = load_tokenizer(registry / "tokenizer.json")
    index = build_index(model, data, pooling="mean", max_chunks=40, tokenizer=tok,
                        dataset_name="code")
    assert len(index) == min(40, len(data)) and index.meta[0]["text"]
    docs = data.documents()  # each entry names the document its chunk came from
    for m in index.meta:
        d = docs.of_chunks([m["chunk"]])[0]
        assert m["source"] == docs.ids[d] and m["part"] == m["chunk"] - docs.starts[d]
    entry = index.meta[5]
    ids, mask = data.get_batch([entry["chunk"]])
    dist, found = index.search(encode_pooled(model, ids, mask, "mean"), 1)
    assert found[0, 0] == 5 and dist[0, 0] < 1e-3


def test_routing_features_use_the_router_and_the_lm_perplexity(registry, tiny_dataset):
    from cir.data import open_dataset
    from cir.experts.evaluate import perplexity
    from cir.router.baselines import Chunks, compute_features
    from cir.router.registry import Registry

    experts = Registry(registry).load().experts
    data = open_dataset(str(tiny_dataset), "test")
    ids, mask = data.get_batch(np.arange(min(6, len(data))))
    comps = [e.compressor for e in experts]
    lms = [e.lm() for e in experts]
    fs = compute_features(Chunks(ids, mask, np.zeros(len(ids), int)), comps, lms, comps[0])
    for k, c in enumerate(comps):
        np.testing.assert_allclose(fs.feats["recon"][:, k], c.score(ids, mask).loss.numpy(),
                                   rtol=1e-5)
        np.testing.assert_allclose(fs.feats["nll"][0][:, k],
                                   perplexity(lms[k], ids, mask)["nll_sum"].numpy())
    assert fs.feats["latent"].shape == (len(ids), comps[0].config.d_model)


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_table_matrix_and_single(registry, tiny_dataset, tmp_path):
    out = _json(["analyze", "table", "--registry", str(registry), "--max-chunks", "8",
                 "--csv", str(tmp_path / "t.csv"), "--json"])
    cells = {(r["compressor"], r["dataset"]): r for r in out["rows"]}
    assert set(cells) == {(c, d) for c in ("code", "prose") for d in ("code", "prose", "random")}
    assert cells["code", "code"]["role"] == "in-domain"
    assert cells["code", "prose"]["role"] == "semi-OOD"
    assert cells["prose", "random"]["role"] == "full-OOD"
    assert (tmp_path / "t.csv").read_text().startswith("compressor,dataset,role")
    single = _json(["analyze", "table", "--compressor", str(registry / "code" / "compressor"),
                    "--in-domain", str(tiny_dataset), "--max-chunks", "8", "--json"])
    assert single["rows"][0]["tra"] == pytest.approx(cells["code", "code"]["tra"])
    md = runner.invoke(app, ["analyze", "table", "--compressor",
                             str(registry / "code" / "compressor"), "--in-domain",
                             str(tiny_dataset), "--max-chunks", "4", "--markdown"])
    assert md.exit_code == 0 and md.stdout.startswith("| compressor |")
    bad = runner.invoke(app, ["analyze", "table", "--compressor", str(tmp_path)])
    assert bad.exit_code == 2 and "error" in bad.output.lower()


def test_cli_plot_writes_pngs_and_summary(registry, tiny_dataset, tiny_prose_dataset, tmp_path):
    out = _json(["analyze", "plot", "--compressor", str(registry / "code" / "compressor"),
                 "--data", str(tiny_dataset), "--data", str(tiny_prose_dataset),
                 "--data", "random", "--method", "pca", "--method", "tsne",
                 "--pooling", "mean", "--max-chunks", "20", "--out", str(tmp_path), "--json"])
    s = out["summary"]
    assert len(s["domains"]) == 3 and 0.0 <= s["linear_separability"] <= 1.0
    assert -1.0 <= s["silhouette"] <= 1.0 and 1 <= s["pca_components_95"] <= s["dim"]
    for m in ("pca", "tsne"):
        png = Path(out["plots"][m])
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
        assert Path(out["coords"][m]).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cli_plot_and_table_load_the_compressor_on_the_given_device(registry, tiny_dataset,
                                                                     tmp_path):
    ckpt = str(registry / "code" / "compressor")
    for args in (["analyze", "plot", "--compressor", ckpt, "--data", str(tiny_dataset),
                  "--data", "random", "--out", str(tmp_path)],
                 ["analyze", "table", "--compressor", ckpt, "--in-domain", str(tiny_dataset)]):
        result = runner.invoke(app, [*args, "--max-chunks", "8", "--device", "cuda"])
        assert result.exit_code != 0
        assert "cuda" in result.output.lower() and "Traceback" not in result.output
    table = ["analyze", "table", "--compressor", ckpt, "--in-domain", str(tiny_dataset),
             "--max-chunks", "8", "--json"]
    assert _json([*table, "--device", "cpu"])["rows"] == _json(table)["rows"]


def test_cli_index_build_and_explain(registry, tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def total_items(total, items=None):\n    return total + items\n" * 8)
    built = _json(["index", "build", "--registry", str(registry), "--max-chunks", "30",
                   "--out", str(tmp_path / "idx"), "--json"])
    assert {b["expert"] for b in built["indexes"]} == {"code", "prose"}
    out = _json(["explain", str(sample), "--registry", str(registry), "--index",
                 str(tmp_path / "idx"), "--k", "2", "--json"])
    first = out["chunks"][0]
    assert first["route"] in ("code", "prose")
    for e in first["experts"].values():
        assert len(e["neighbours"]) == 2 and math.isfinite(e["loss"])
        assert e["neighbours"][0]["distance"] <= e["neighbours"][1]["distance"]
        assert e["neighbours"][0]["text"]
        assert e["neighbours"][0]["source"].startswith("file:")  # a file of the expert's corpus
    shown = CliRunner().invoke(app, ["explain", str(sample), "--registry", str(registry), "--index",
                                     str(tmp_path / "idx"), "--k", "1"], env={"COLUMNS": "250"})
    nb = first["experts"]["code"]["neighbours"][0]
    assert shown.exit_code == 0 and f"{nb['source']} (chunk {nb['part'] + 1})" in shown.stdout


def test_cli_explain_refuses_what_score_skips(registry, tmp_path):
    cases = {"binary.bin": b"\x00\x01 not text", "empty.txt": b"", "blank.txt": b" \n\t\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    reasons = {"binary.bin": "binary", "empty.txt": "empty", "blank.txt": "whitespace only",
               "nowhere.txt": "not found", ".": "directory"}
    for name, reason in reasons.items():
        res = CliRunner().invoke(app, ["explain", str(tmp_path / name), "--registry",
                                       str(registry)])
        assert res.exit_code != 0 and reason in res.output, (name, res.output)
        assert "Traceback" not in res.output


def test_read_chunks_reads_the_first_chunks_as_score_chunks_them(tiny_tokenizer, tmp_path):
    from cir.data import chunk_text, load_tokenizer
    from cir.router.score import FileReport, read_chunks

    tok = load_tokenizer(tiny_tokenizer)
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400))
    path = tmp_path / "a.py"
    path.write_text(text)
    ref_ids, ref_len = chunk_text(text, tok, 16)
    ids, mask, warnings = read_chunks(path, tok, 16)
    assert warnings == [] and ids.shape == (len(ref_ids), 16)
    assert torch.equal(ids, torch.from_numpy(ref_ids))
    assert mask.sum(1).tolist() == ref_len.tolist()
    first, _, _ = read_chunks(path, tok, 16, max_chunks=3)
    assert torch.equal(first, ids[:3])
    path.write_bytes(b"caf\xe9 " * 20)  # Latin-1: read with a warning
    assert "not valid UTF-8" in read_chunks(path, tok, 16)[2][0]
    path.write_bytes(b"")
    skipped = read_chunks(path, tok, 16)
    assert isinstance(skipped, FileReport) and skipped.reason == "empty"


def test_cli_bench_routing(registry, tiny_corpus):
    out = _json(["bench", "routing", "--registry", str(registry), "--max-train", "30",
                 "--max-test", "10", "--json"])
    methods = {r["method"]: r for r in out["methods"]}
    assert set(methods) == {"reconstruction", "likelihood", "gate-emb", "gate-tfidf",
                            "tfidf-kmeans", "mahalanobis", "knn-latent", "unigram-mix"}
    for r in methods.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["ms_per_chunk"] > 0
        assert 0.0 <= r["ood"]["random"]["auroc"] <= 1.0
    assert methods["reconstruction"]["on_mount"].startswith("nothing retrained")
    assert out["mount"] == []  # two domains: no mount experiment


def test_cli_bench_routing_on_checkpoints_matches_the_registry(
        registry, tiny_dataset, tiny_prose_dataset, tmp_path):
    """The same compressors given as checkpoints route exactly as their registry experts."""
    args = ["bench", "routing", "--max-train", "30", "--max-test", "10", "--no-lm", "--json"]
    via_registry = _json(args + ["--registry", str(registry), "--data", f"code={tiny_dataset}",
                                 "--data", f"prose={tiny_prose_dataset}"])
    pairs = []
    for name, data in (("code", tiny_dataset), ("prose", tiny_prose_dataset)):
        pairs += ["--compressor", f"{name}={registry / name / 'compressor'}",
                  "--data", f"{name}={data}"]
    via_ckpts = _json(args + pairs)
    assert via_ckpts["domains"] == ["code", "prose"]
    assert via_ckpts["n_test"] == via_registry["n_test"] > 0
    want = {r["method"]: r for r in via_registry["methods"]}
    got = {r["method"]: r for r in via_ckpts["methods"]}
    assert set(got) == set(want) and "likelihood" not in got
    assert "unigram-mix" in got
    for method in ("reconstruction", "mahalanobis", "knn-latent", "tfidf-kmeans", "unigram-mix"):
        assert got[method]["accuracy"] == want[method]["accuracy"], method
        assert got[method]["accuracy_by_domain"] == want[method]["accuracy_by_domain"], method
        assert got[method]["ood"]["random"]["auroc"] == pytest.approx(
            want[method]["ood"]["random"]["auroc"]), method

    shown = runner.invoke(app, ["bench", "routing", "--max-train", "30", "--max-test", "10",
                                *pairs])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    header = [x for x in lines if "method" in x and "code" in x and "prose" in x]
    assert header, shown.output  # the per-domain table: a column per domain
    home = got["reconstruction"]["accuracy_by_domain"]
    row = [x for x in lines[lines.index(header[0]):] if "reconstruction" in x][0]
    assert row.split()[1:6:2] == ["reconstruction", f"{100 * home['code']:.1f}%",
                                  f"{100 * home['prose']:.1f}%"], row
    two = _json(args + pairs + ["--method", "reconstruction", "--method", "gate-tfidf",
                                "--method", "reconstruction"])
    assert [r["method"] for r in two["methods"]] == ["reconstruction", "gate-tfidf"]
    assert [r["method"] for r in two["mount"]] == []  # two domains: no mount experiment
    for r in two["methods"]:
        assert r["accuracy"] == got[r["method"]]["accuracy"], r["method"]
    from cir.data import open_dataset

    per_domain = [len(open_dataset(str(d), "train")) for d in (tiny_dataset, tiny_prose_dataset)]
    sizes = _json(["bench", "routing", "--max-test", "10", "--no-lm", "--json", *pairs,
                   "--max-train-latent", "2", "--method", "gate-tfidf", "--method",
                   "mahalanobis"])
    # by default the baselines see every training chunk, those on latents 2 per domain
    assert sizes["n_train"] == sum(per_domain) and sizes["n_train_latent"] == 4
    assert min(per_domain) > 2
    typo = runner.invoke(app, ["bench", "routing", *pairs, "--method", "knn"])
    assert typo.exit_code == 2 and "unknown method knn" in typo.output, typo.output
    no_lm = runner.invoke(app, ["bench", "routing", *pairs, "--method", "likelihood"])
    assert no_lm.exit_code == 2 and "expert LMs" in no_lm.output, no_lm.output
    with pytest.MonkeyPatch.context() as mp:  # no faiss: kNN fails at once, the rest runs
        mp.setitem(sys.modules, "faiss", None)
        import cir.router.baselines as baselines

        def no_scoring(*a, **k):
            raise AssertionError("scored before failing")

        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(baselines, "bench_routing", no_scoring)
            no_faiss = runner.invoke(app, ["bench", "routing", *pairs])
        assert no_faiss.exit_code == 2 and "needs faiss" in no_faiss.output, no_faiss.output
        rest = _json(args + pairs + ["--method", "reconstruction", "--method", "mahalanobis"])
        assert [r["method"] for r in rest["methods"]] == ["reconstruction", "mahalanobis"]
    with pytest.MonkeyPatch.context() as mp:  # methods that read no model run none
        import cir.router.latent_index as latent_index

        mp.setattr(baselines, "recon_losses", no_scoring)
        mp.setattr(latent_index, "encode_pooled", no_scoring)
        bags = _json(args + pairs + ["--method", "unigram-mix", "--method", "gate-tfidf"])
        assert [r["method"] for r in bags["methods"]] == ["unigram-mix", "gate-tfidf"]
        assert bags["methods"][0]["accuracy"] == got["unigram-mix"]["accuracy"]
    with pytest.MonkeyPatch.context() as mp:  # nothing fitted: no training chunk is read
        from cir.data.shards import ChunkDataset

        real_batch = ChunkDataset.get_batch
        read = []
        mp.setattr(ChunkDataset, "get_batch",
                   lambda self, idx: read.append(self.split) or real_batch(self, idx))
        recon = _json(args + pairs + ["--method", "reconstruction"])
        assert "train" not in read and "test" in read
        assert recon["n_train"] == via_ckpts["n_train"]
        assert recon["methods"][0]["accuracy"] == got["reconstruction"]["accuracy"]
    unpaired = runner.invoke(app, ["bench", "routing", *pairs[:4], "--data", "extra=x"])
    assert unpaired.exit_code != 0 and "unpaired: extra" in unpaired.output
    both = runner.invoke(app, ["bench", "routing", *pairs, "--registry", str(registry)])
    assert both.exit_code != 0 and "not both" in both.output
    bad = runner.invoke(app, ["bench", "routing", "--compressor", "code"])
    assert bad.exit_code != 0 and "--compressor expects NAME=CKPT" in bad.output
    retok = shutil.copytree(registry / "code" / "compressor", tmp_path / "retok")
    tok = retok / "tokenizer.json"  # the same vocabulary in another file: another sha256
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))
    other = runner.invoke(app, ["bench", "routing", "--compressor", f"code={retok}",
                                *pairs[2:]])
    assert other.exit_code == 2 and "another tokenizer" in other.output, other.output

def test_expert_dataset_rebuilds_a_mounted_corpus_from_its_source(
        registry, tiny_corpus, tiny_dataset):
    from types import SimpleNamespace

    from cir.data import open_dataset
    from cir.router.analysis import expert_dataset
    from cir.router.registry import Registry

    reg = Registry(registry)
    info = SimpleNamespace(name="code2", meta={"source": str(tiny_corpus / "code"),
                                               "corpus": {"seq_len": 64},
                                               "corpus_fingerprint": "abc"})
    rebuilt = open_dataset(expert_dataset(reg, info), "test")
    want = open_dataset(str(tiny_dataset), "test")
    assert len(rebuilt) == len(want)
    np.testing.assert_array_equal(rebuilt.get_batch([0])[0], want.get_batch([0])[0])
    assert expert_dataset(reg, info, {"code2": "elsewhere"}) == "elsewhere"
    with pytest.raises(ValueError, match="--data nosrc=DATASET"):
        expert_dataset(reg, SimpleNamespace(name="nosrc", meta={}))
