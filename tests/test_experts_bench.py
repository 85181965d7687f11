"""Decode benchmark, analytic FLOPs, and the expert CLI commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cir.cli.main import app
from cir.experts.bench import (
    BenchResult,
    StaticDecodeStep,
    analytic_flops,
    cuda_index,
    decode_attend,
    decode_bench,
    headline_ratios,
    hit_bytes,
    measure_bandwidth,
    memory_fraction,
    plot_decode,
    probe_context,
    ratios,
    search_max_n,
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
    seen, partial = [], []
    result = decode_bench("debug", ns=[16, 64], steps=3, cuda_graphs=True, on_point=seen.append,
                          on_model=lambda r: partial.append(len(r.points)))
    assert len(result.points) == len(seen) == 8
    assert partial == [2, 4, 6, 8]  # the partial result after each model
    assert len(set(result.params.values())) == 1  # same parameter count for every model
    by = {(p.model, p.n): p for p in result.points}
    assert all(p.hit_ms > 0 and p.miss_ms > 0 and p.error is None for p in result.points)
    assert by["tconstformer", 16].cache_bytes == by["tconstformer", 64].cache_bytes
    assert by["tlinformer", 64].cache_bytes > by["tlinformer", 16].cache_bytes
    assert by["transformer-static", 64].cache_bytes > by["tlinformer", 64].cache_bytes
    # CPU: the static-shape step runs uncaptured and agrees with the model's own step;
    # the concat cache has no static-shape step and says so
    for p in result.points:
        if p.model == "transformer-concat":
            assert p.hit_path == "eager" and p.graph_logit_diff is None
            assert p.hit_ms == p.hit_eager_ms
        else:
            assert p.hit_path == "static-step" and p.graph_error is None
            assert p.graph_logit_diff < 1e-4 and p.graph_argmax_agree
    assert "torch.cat" in result.cuda_graphs["transformer-concat"]
    assert result.cuda_graphs["tlinformer"] == "static-step"
    # bandwidth bound: ideal = bytes read / measured bandwidth, efficiency = ideal / measured
    assert result.bandwidth_bytes_per_s > 0
    p = by["tlinformer", 64]
    assert p.ideal_hit_ms == pytest.approx(p.hit_bytes / result.bandwidth_bytes_per_s * 1e3)
    assert p.efficiency == pytest.approx(p.ideal_hit_ms / p.hit_ms)
    # without a search the largest N is the sweep's
    assert result.max_n["tlinformer"]["fits"] == 64 and "sweep" in result.max_n["tlinformer"]["method"]
    rows = ratios(result)
    assert {r["baseline"] for r in rows} == {"tconstformer", "transformer-static",
                                             "transformer-concat"}
    head = headline_ratios(result)
    assert head["n"] == 64 and head["compared"] == ["transformer-static", "transformer-concat"]
    static = next(r for r in head["rows"] if r["baseline"] == "transformer-static")
    assert static["hit"] == pytest.approx(by["transformer-static", 64].hit_ms / p.hit_ms)
    assert static["miss"] == pytest.approx(by["transformer-static", 64].miss_ms / p.miss_ms)
    assert static["max_n"] == 1.0
    again = BenchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    png = plot_decode(result, tmp_path / "bench.png")
    assert png.stat().st_size > 10_000
    # a run without TLinFormer (nothing to divide by) or cut short still draws
    without = BenchResult.from_dict(result.to_dict())
    without.points = [p for p in without.points if p.model != "tlinformer"]
    assert plot_decode(without, tmp_path / "no-tlin.png").stat().st_size > 10_000
    empty = BenchResult(preset="debug", device="cpu", dtype="float32", params={})
    assert plot_decode(empty, tmp_path / "empty.png").is_file()


def test_decode_bench_cpu_defaults_and_step_limits():
    result = decode_bench("debug", models=["tlinformer"], ns=[16], steps=2,
                          bandwidth_bytes_per_s=1e9)
    assert result.points[0].hit_path == "eager" and result.cuda_graphs["tlinformer"] == "off"
    assert result.bandwidth_bytes_per_s == 1e9
    # every hit stays inside one w_og=8 window: 3 eager + 3 static at most with graphs
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.3"):
        decode_bench("debug", models=["tlinformer"], ns=[16], steps=4, cuda_graphs=True)


def test_decode_bench_runs_the_largest_n_search():
    # on CPU nothing runs out of memory: the search grows x2 from the swept N to its limit
    result = decode_bench("debug", models=["tlinformer", "transformer-concat"], ns=[16],
                          steps=2, max_n_search=True, search_limit=64,
                          bandwidth_bytes_per_s=1e9)
    for name in ("tlinformer", "transformer-concat"):
        found = result.max_n[name]
        assert [p["n"] for p in found["probes"]] == [32, 64]
        assert all(p["ok"] for p in found["probes"])
        assert found["fits"] == 64 and found["oom_at"] is None
        assert found["stopped"] == "search limit N=64"


def test_decode_bench_rejects_unknown_models():
    with pytest.raises(ValueError, match="valid: tlinformer"):
        decode_bench("debug", models=["nope"], ns=[16])


def test_cli_bench_decode_json(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "decode", "--preset", "debug", "--n", "16",
                                   "--models", "tlinformer,transformer-static", "--steps", "2",
                                   "--cuda-graphs", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert {p["model"] for p in payload["points"]} == {"tlinformer", "transformer-static"}
    assert payload["headline"]["n"] == 16 and payload["complete"] is True
    assert {p["hit_path"] for p in payload["points"]} == {"static-step"}
    assert json.loads((out / "bench.json").read_text())["headline"] == payload["headline"]
    assert (out / "bench.png").is_file()


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
        found = result.max_n[name]
        assert found["fits"] is not None and found["oom_at"] > found["fits"]
        pts = [p for p in result.points if p.model == name and p.error is None]
        assert all(p.peak_bytes <= 2 * 2**30 for p in pts)
        assert all(p.hit_path == "cuda-graph" and p.graph_argmax_agree for p in pts)
        assert all(p.graph_logit_diff < 0.1 for p in pts)  # bf16: same logits up to rounding


def test_cli_expert_train_on_tiny_dataset(request, tmp_path):
    try:
        dataset = request.getfixturevalue("tiny_dataset")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_dataset fixture is not available")
    for optimizer in ("adamw", "muon"):
        out = tmp_path / optimizer
        res = CliRunner().invoke(app, [
            "expert", "train", "--data", str(dataset), "--out", str(out), "--preset", "debug",
            "--steps", "6", "--batch-size", "4", "--warmup-steps", "2", "--eval-every", "6",
            "--ckpt-every", "6", "--device", "cpu", "--set", "seq_len=64",
            "--optimizer", optimizer, "--json"])
        assert res.exit_code == 0, res.output
        payload = json.loads(res.stdout)
        assert payload["step"] == 6 and (out / "model.safetensors").is_file()
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert json.loads(state["train_config"])["optimizer"] == optimizer
        assert ("muon" in state["optimizer"]) == (optimizer == "muon")


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


# --------------------------------------------------------------------------- static-shape step


@pytest.mark.parametrize("arch,kind,n", [("tlinformer", None, 24), ("tconstformer", None, 24),
                                         ("transformer", "static", 21)])
def test_static_decode_step_matches_the_model_step(arch, kind, n):
    """The step captured in a CUDA graph (fixed buffers, position on the device, masked
    full-buffer attention) computes what ``model.step`` computes, token after token."""
    torch.manual_seed(0)
    model = build_model(arch, "debug").double().eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, n))
    ref = model.new_cache(1, n + 8) if kind is None else model.new_cache(1, n + 8, kind=kind)
    with torch.no_grad():
        logits = model.prefill(prompt, ref)
        if kind is None:  # n is a multiple of w_og: the first step slides the window
            logits = model.step(logits.argmax(-1), ref)
        cache = copy.deepcopy(ref)
        step = StaticDecodeStep(model, cache, logits.argmax(-1))
        assert step.room == (model.config.w_og - 1 if kind is None else 8)
        ptrs = [t.data_ptr() for t in (step.token, step.pos, step.off)]
        for _ in range(5):
            want = model.step(logits.argmax(-1), ref)
            got = step()
            step.advance(got)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
            logits = want
        step.commit(5)
    assert [t.data_ptr() for t in (step.token, step.pos, step.off)] == ptrs  # fixed buffers
    assert step.pos.item() == ref.length == cache.length
    assert torch.equal(step.token, logits.argmax(-1))
    bufs = (lambda c: [b for blk in c.bufs for b in blk]) if kind is None else (lambda c: c.bufs)
    for a, b in zip(bufs(cache), bufs(ref), strict=True):
        torch.testing.assert_close(a.k, b.k, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.v, b.v, rtol=0, atol=1e-12)
    if kind is None:
        assert torch.equal(cache.tokens, ref.tokens)


def test_static_decode_step_refuses_growing_or_sliding_caches():
    model = build_model("transformer", "debug").eval()
    cache = model.new_cache(1, 32, kind="concat")
    with torch.no_grad():
        logits = model.prefill(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="torch.cat"):
        StaticDecodeStep(model, cache, logits.argmax(-1))
    tlin = build_model("tlinformer", "debug").eval()
    window = tlin.new_cache(1, 32)
    with torch.no_grad():
        logits = tlin.prefill(torch.zeros(1, 16, dtype=torch.long), window)
    with pytest.raises(ValueError, match="slides the window"):
        StaticDecodeStep(tlin, window, logits.argmax(-1))


def test_decode_attend_is_softmax_attention_over_the_valid_prefix():
    torch.manual_seed(0)
    q = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 3, 96, 8, dtype=torch.float64)  # 96 = 3 chunks of 32
    for upto in (0, 40, 95):
        valid = torch.arange(96) <= upto
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, : upto + 1], v[:, :, : upto + 1])
        torch.testing.assert_close(decode_attend(q, k, v, valid), want)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(decode_attend(q, k, v), want)


# --------------------------------------------------------------------------- bytes, bandwidth


def test_hit_bytes_are_the_weights_plus_the_kv_a_hit_reads():
    n_params, elem = 1000, 2
    tlin, base = TLinFormerConfig.from_name("debug"), TransformerConfig.from_name("debug")
    const = TConstFormerConfig.from_name("debug")
    d = tlin.n_embd

    def slope(cfg, arch):
        return hit_bytes(cfg, arch, 2048, elem, n_params) - hit_bytes(cfg, arch, 1024, elem,
                                                                      n_params)

    assert slope(base, "transformer") == 1024 * base.n_layer * 2 * d * elem
    assert slope(tlin, "tlinformer") == 1024 * tlin.n_blocks * 2 * d * elem
    assert slope(const, "tconstformer") == 0
    assert hit_bytes(base, "transformer", 0, elem, n_params) == n_params * elem
    # the K/V counted is the K/V the caches hold (windowed: after a slide at N)
    for arch in ("tlinformer", "tconstformer"):
        model = build_model(arch, "debug").eval()
        cache = model.new_cache(1, 40)
        with torch.no_grad():
            logits = model.prefill(torch.zeros(1, 32, dtype=torch.long), cache)
            model.step(logits.argmax(-1), cache)
        assert hit_bytes(model.config, arch, 32, 4, 0) == cache.nbytes()["kv"]
    model = build_model("transformer", "debug")
    assert hit_bytes(model.config, "transformer", 32, 4, 0) == model.new_cache(1, 32).nbytes()["kv"]


def test_measure_bandwidth_on_cpu_counts_read_and_written_bytes():
    bw = measure_bandwidth(torch.device("cpu"), nbytes=2**20, reps=3)
    assert 1e8 < bw < 1e13  # bytes per second, read + write


# --------------------------------------------------------------------------- largest N


def test_search_max_n_brackets_then_bisects_in_log_probes():
    limit_n = 300_000
    found = search_max_n(lambda n: n <= limit_n, start=1024, step=256)
    assert found["fits"] <= limit_n < found["oom_at"]
    assert found["oom_at"] <= found["fits"] * 1.02 or found["oom_at"] - found["fits"] <= 256
    probes = [p["n"] for p in found["probes"]]
    assert all(n % 256 == 0 for n in probes)
    assert probes[:4] == [1024, 2048, 4096, 8192]  # x2 growth first
    assert len(probes) <= 16 and found["stopped"] is None  # not a sweep over 1K steps
    # growth starts above a known fit; a first probe that fails halves until one fits
    again = search_max_n(lambda n: n <= limit_n, start=1024, step=256, known_ok=131072)
    assert again["probes"][0]["n"] == 262144 and again["fits"] == found["fits"]
    small = search_max_n(lambda n: n <= 5000, start=2**20, step=256)
    assert small["fits"] <= 5000 < small["oom_at"] and small["fits"] >= 5000 * 0.95
    none = search_max_n(lambda n: False, start=1024, step=256)
    assert none["fits"] is None and none["oom_at"] == 256


def test_search_max_n_keeps_its_time_budget_and_limit():
    now = [0.0]

    def clock():
        return now[0]

    def probe(n):  # a probe's time grows with N: 1 s per million tokens
        now[0] += n / 1e6
        return n <= 50_000_000, {"peak_bytes": n}

    found = search_max_n(probe, start=2**20, step=1024, deadline=20.0, clock=clock)
    assert found["stopped"] == "time budget" and now[0] <= 20.0
    assert found["fits"] is not None and all(p["peak_bytes"] == p["n"] for p in found["probes"])
    capped = search_max_n(lambda n: True, start=1024, step=1024, limit=2**20)
    assert capped["fits"] == 2**20 and capped["oom_at"] is None
    assert capped["stopped"] == f"search limit N={2**20}"


@pytest.mark.parametrize("name", ["tlinformer", "tconstformer", "transformer-static",
                                  "transformer-concat"])
def test_probe_context_builds_n_tokens_and_reports_oom(name, monkeypatch):
    from cir.experts.bench import BENCH_MODELS

    arch, kind = BENCH_MODELS[name]
    model = build_model(arch, "debug").eval()
    seen = []
    step = model.step

    def spy(token, cache):
        seen.append((cache.length, cache.nbytes()["kv"]))
        return step(token, cache)

    monkeypatch.setattr(model, "step", spy)
    ok, info = probe_context(model, kind, 64, torch.device("cpu"))
    assert ok and info == {"peak_bytes": None}
    assert seen[0][0] == 64  # the decode step runs at context 64
    if kind == "concat":  # its K/V was built at N = 64 positions before the step
        assert seen[0][1] == hit_bytes(model.config, arch, 64, 4, 0)

    def oom(token, cache):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "step", oom)
    assert probe_context(model, kind, 64, torch.device("cpu"))[0] is False

    def broken(token, cache):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "step", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        probe_context(model, kind, 64, torch.device("cpu"))


def test_plot_decode_draws_the_largest_n_as_bars_on_a_linear_axis_from_zero(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    # the largest-N limits of run 2 on the whole card: within 8% of each other, which a log
    # axis cut at the smallest bar drew as a several-fold gap
    fits = {"tlinformer": 5_046_272, "tconstformer": 5_046_272,
            "transformer-static": 5_177_344, "transformer-concat": 4_784_128}
    result = BenchResult(preset="paper-41m", device="cpu", dtype="bfloat16", params={},
                         max_n={m: {"fits": n, "oom_at": n + 65_536} for m, n in fits.items()})
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot_decode(result, tmp_path / "bench.png")
    bars = figures[0].axes[5]
    assert bars.get_yscale() == "linear" and bars.get_ylim()[0] == 0
    assert [p.get_height() for p in bars.patches] == [n / 2**20 for n in fits.values()]
    labels = [t.get_text() for t in bars.texts]
    assert labels == ["4.81M", "4.81M", "4.94M", "4.56M"]  # M = 2^20, as the axis
    assert "2^20" in bars.get_ylabel()
