"""Decode benchmark, analytic FLOPs, and the expert CLI commands."""

from __future__ import annotations

import json

import pytest
import torch
from cir.cli.main import app
from cir.experts.bench import (
    analytic_flops,
    cuda_index,
    decode_bench,
    memory_fraction,
    plot_decode,
    ratios,
)
from cir.experts.registry import build_model
from cir.experts.tconstformer import TConstFormerConfig
from cir.experts.tlinformer import TLinFormerConfig
from cir.experts.transformer import TransformerConfig
from typer.testing import CliRunner

from cir.checkpoint import save_checkpoint


def test_analytic_flops_slopes_follow_the_paper():
    tlin, base = TLinFormerConfig.from_name("small"), TransformerConfig.from_name("small")
    const = TConstFormerConfig.from_name("small")
    d = tlin.n_embd

    def slope(cfg, arch, key):
        return analytic_flops(cfg, arch, 2048)[key] - analytic_flops(cfg, arch, 1024)[key]

    # cache hit: TLinFormer's per-token cost grows with D per block (Eq. 1 with C1 = D),
    # the decoder's with D per layer, TConstFormer's not at all
    assert slope(tlin, "tlinformer", "hit") == 1024 * 4 * d * tlin.n_blocks
    assert slope(base, "transformer", "hit") == 1024 * 4 * d * base.n_layer
    assert slope(const, "tconstformer", "hit") == 0
    # cache miss: linear in N for TLinFormer, quadratic for the decoder (second differences)
    m = [analytic_flops(tlin, "tlinformer", n)["miss"] for n in (1024, 2048, 3072)]
    assert m[2] - 2 * m[1] + m[0] == pytest.approx(0, abs=1e-3 * m[0])
    b = [analytic_flops(base, "transformer", n)["miss"] for n in (1024, 2048, 3072)]
    assert b[2] - 2 * b[1] + b[0] == pytest.approx(base.n_layer * 4 * d * 1024**2)


def test_decode_bench_on_cpu(tmp_path):
    torch.manual_seed(0)
    seen = []
    result = decode_bench("debug", ns=[16, 64], steps=3, on_point=seen.append)
    assert len(result.points) == len(seen) == 8
    assert len(set(result.params.values())) == 1  # same parameter count for every model
    by = {(p.model, p.n): p for p in result.points}
    assert all(p.hit_ms > 0 and p.miss_ms > 0 and p.error is None for p in result.points)
    assert by["tconstformer", 16].cache_bytes == by["tconstformer", 64].cache_bytes
    assert by["tlinformer", 64].cache_bytes > by["tlinformer", 16].cache_bytes
    assert by["transformer-static", 64].cache_bytes > by["tlinformer", 64].cache_bytes
    rows = ratios(result)
    assert {r["baseline"] for r in rows} == {"tconstformer", "transformer-static",
                                             "transformer-concat"}
    png = plot_decode(result, tmp_path / "bench.png")
    assert png.stat().st_size > 10_000


def test_decode_bench_rejects_unknown_models():
    with pytest.raises(ValueError, match="valid: tlinformer"):
        decode_bench("debug", models=["nope"], ns=[16])


def test_cli_bench_decode_json(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "decode", "--preset", "debug", "--n", "16",
                                   "--models", "tlinformer,transformer-static", "--steps", "2",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert {p["model"] for p in payload["points"]} == {"tlinformer", "transformer-static"}
    assert (out / "bench.json").is_file() and (out / "bench.png").is_file()


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main(x):\n    return x + 1\n"] * 20, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def test_cli_generate_json(tmp_path):
    vocab = _tokenizer(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model("tlinformer", "debug", vocab_size=vocab)
    save_checkpoint(tmp_path / "ck", model, tokenizer=tmp_path / "tokenizer.json")
    args = ["generate", str(tmp_path / "ck"), "--prompt", "def main(", "--max-new-tokens",
            "20", "--seed", "3", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    payload = json.loads(first.stdout)
    assert len(payload["new_ids"]) == 20
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["new_ids"] == payload["new_ids"]  # seeded


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


@pytest.mark.gpu
def test_decode_bench_on_cuda_finds_max_n_under_a_budget():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = decode_bench("small", models=["tlinformer", "transformer-static"],
                          ns=[2**k for k in range(10, 24)], device="cuda", steps=4,
                          max_memory_gb=2.0, time_budget_s=120)
    for name in ("tlinformer", "transformer-static"):
        assert result.max_n[name]["fits"] is not None
        pts = [p for p in result.points if p.model == name and p.error is None]
        assert all(p.peak_bytes <= 2 * 2**30 for p in pts)
    assert result.max_n["tlinformer"]["fits"] > result.max_n["transformer-static"]["fits"]


def test_cli_expert_train_on_tiny_dataset(request, tmp_path):
    try:
        dataset = request.getfixturevalue("tiny_dataset")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_dataset fixture is not available")
    out = tmp_path / "tlin"
    res = CliRunner().invoke(app, ["expert", "train", "--data", str(dataset), "--out", str(out),
                                   "--preset", "debug", "--steps", "6", "--batch-size", "4",
                                   "--warmup-steps", "2", "--eval-every", "6", "--ckpt-every",
                                   "6", "--device", "cpu", "--set", "seq_len=64", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["step"] == 6 and (out / "model.safetensors").is_file()


def test_memory_budget_is_a_fraction_of_the_card_on_an_indexed_device():
    card = 80 * 2**30
    assert memory_fraction(24, card) == pytest.approx(0.3)
    assert memory_fraction(200, card) == 1.0  # a budget above the card: the whole card
    for bad in (0, -1):
        with pytest.raises(ValueError, match="> 0 GiB"):
            memory_fraction(bad, card)
    # set_per_process_memory_fraction rejects a bare "cuda": the index is resolved first
    assert cuda_index(torch.device("cuda:1")) == 1
    assert cuda_index(torch.device("cuda"), current=lambda: 3) == 3
