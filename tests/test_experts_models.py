"""Expert LMs: cached == uncached, TLinFormer == a naive reference of its graph, cache sizes,
parameter parity, causality, save -> load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cir.experts.generate import generate
from cir.experts.layers import attend, naive_attention
from cir.experts.tconstformer import TConstFormer, TConstFormerConfig
from cir.experts.tlinformer import TLinFormer, TLinFormerConfig
from cir.experts.transformer import Transformer, TransformerConfig

from cir.checkpoint import load_checkpoint, save_checkpoint

MODELS = [(TLinFormer, TLinFormerConfig), (TConstFormer, TConstFormerConfig),
          (Transformer, TransformerConfig)]
IDS = [m.kind for m, _ in MODELS]


def _model(cls, cfg_cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(cfg_cls.from_name("debug", **overrides)).double().eval()


# --------------------------------------------------------------------------- caching


@pytest.mark.parametrize(("cls", "cfg_cls"), MODELS, ids=IDS)
def test_greedy_cached_equals_uncached_across_slides(cls, cfg_cls):
    model = _model(cls, cfg_cls)
    prompt = torch.randint(0, 512, (2, 5))
    new = 30  # w_og = 8 in debug: the window slides 4 times
    cached = generate(model, prompt, new, temperature=0, use_cache=True)
    plain = generate(model, prompt, new, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize(("cls", "cfg_cls"), MODELS, ids=IDS)
@pytest.mark.parametrize("prompt_len", [1, 8, 13])
def test_step_logits_match_full_forward(cls, cfg_cls, prompt_len):
    model = _model(cls, cfg_cls)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(ids)  # [B, T, V]
        cache = model.new_cache(2, 40)
        got = [model.prefill(ids[:, :prompt_len], cache)]
        got += [model.step(ids[:, t], cache) for t in range(prompt_len, 40)]
    stepped = torch.stack(got, dim=1)  # [B, T - prompt_len + 1, V]
    torch.testing.assert_close(stepped, full[:, prompt_len - 1 :], rtol=1e-9, atol=1e-9)
    if cls is not Transformer:
        assert cache.syncs >= 3  # the context side was recomputed at each slide


def test_concat_cache_matches_static_cache():
    model = _model(Transformer, TransformerConfig)
    ids = torch.randint(0, 512, (1, 20))
    out = {}
    with torch.no_grad():
        for kind in ("static", "concat"):
            cache = model.new_cache(1, 20, kind=kind)
            logits = [model.prefill(ids[:, :4], cache)]
            logits += [model.step(ids[:, t], cache) for t in range(4, 20)]
            out[kind] = torch.stack(logits, 1)
    torch.testing.assert_close(out["static"], out["concat"], rtol=0, atol=1e-12)


def _kv_bytes_after(model, n: int) -> dict[str, int]:
    cache = model.new_cache(1, n + 1)
    with torch.no_grad():
        model.prefill(torch.randint(0, 512, (1, n)), cache)
        model.step(torch.randint(0, 512, (1,)), cache)  # n is a multiple of w_og: a slide
    return cache.nbytes()


def test_tconstformer_cache_does_not_grow_with_n():
    model = _model(TConstFormer, TConstFormerConfig)
    sizes = [_kv_bytes_after(model, n)["kv"] for n in (16, 64, 256)]
    assert sizes[0] > 0 and sizes[0] == sizes[1] == sizes[2]


def test_tlinformer_cache_grows_only_in_raw_context_kv():
    model = _model(TLinFormer, TLinFormerConfig)
    c = model.config
    small, large = _kv_bytes_after(model, 64), _kv_bytes_after(model, 256)
    for part in ("zip_kv", "window_kv"):
        assert small[part] == large[part] > 0
    per_token = c.n_blocks * 2 * c.n_embd * 8  # K and V of each compress layer, float64
    assert large["context_kv"] - small["context_kv"] == (256 - 64) * per_token
    assert large["context_kv"] == 256 * per_token


# --------------------------------------------------------------------------- reference graph


def _rms(norm, x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, pos, base):
    half = x.shape[-1] // 2
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(half):
            a = pos[t] * base ** (-i / half)
            x1, x2 = x[t, i], x[t, i + half]
            out[t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[t, i + half] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def _attn(layer, qsrc, qpos, ksrc, kpos, base, causal=False):
    """Multi-head attention with plain loops and an explicit softmax; [Tq, D] before proj."""
    d = qsrc.shape[-1]
    nh = layer.n_head
    hd = d // nh
    w = layer.qkv.weight
    heads = []
    for h in range(nh):
        sl = slice(h * hd, (h + 1) * hd)
        q = _rope(qsrc @ w[:d][sl].T, qpos, base)
        k = _rope(ksrc @ w[d : 2 * d][sl].T, kpos, base)
        v = ksrc @ w[2 * d :][sl].T
        out = torch.zeros(len(qpos), hd, dtype=qsrc.dtype)
        for i in range(len(qpos)):
            keys = [j for j in range(len(kpos)) if not causal or kpos[j] <= qpos[i]]
            s = torch.stack([q[i] @ k[j] / math.sqrt(hd) for j in keys])
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[i] = sum(p[n] * v[j] for n, j in enumerate(keys))
        heads.append(out)
    return torch.cat(heads, dim=-1)


def _ffn_res(layer, x):
    f = layer.ffn
    h = _rms(layer.norm2, x)
    return x + f.down(torch.nn.functional.silu(f.gate(h)) * f.up(h))


def _gen_layer(layer, g, gpos, cross, base):
    h = _rms(layer.norm1, g)
    o = _attn(layer, h, gpos, h, gpos, base, causal=True)
    if cross is not None:
        o = o + _attn(layer, h, gpos, *cross, base)
    return _ffn_res(layer, g + layer.proj(o))


def _reference_logits(model, ids):
    """TLinFormer / TConstFormer graph for one sequence, written from the paper's description."""
    c, base = model.config, model.config.rope_base
    x = model.emb.weight[ids]
    outs = []
    for s in range(0, len(ids), c.w_og):
        g, gpos = x[s : s + c.w_og], list(range(s, min(len(ids), s + c.w_og)))
        ctx, cpos = x[:s], list(range(s))
        for block in model.blocks:
            layers = list(block.layers)
            if s == 0:
                for layer in layers:
                    g = _gen_layer(layer, g, gpos, None, base)
                continue
            w = min(c.w_oh, s)
            zpos = cpos[-w:]
            hc = _rms(layers[0].norm1, ctx)
            z = _ffn_res(layers[0], ctx[-w:] + layers[0].proj(_attn(layers[0], hc[-w:], zpos, hc, cpos, base)))
            raw = (hc, cpos) if model.compress_cross else None
            g = _gen_layer(layers[0], g, gpos, raw, base)
            for layer in layers[1:-1]:
                hz = _rms(layer.norm1, z)
                g = _gen_layer(layer, g, gpos, (hz, zpos), base)
                z = _ffn_res(layer, z + layer.proj(_attn(layer, hz, zpos, hz, zpos, base)))
            rest = layers[-1]
            hz = _rms(rest.norm1, z)
            g = _gen_layer(rest, g, gpos, (hz, zpos), base)
            ctx = _ffn_res(rest, ctx + rest.proj(_attn(rest, _rms(rest.norm1, ctx), cpos, hz, zpos, base)))
        outs.append(g)
    h = _rms(model.norm, torch.cat(outs))
    return h @ model.emb.weight.T


@pytest.mark.parametrize(
    ("cls", "cfg_cls", "w_oh"),
    [(TLinFormer, TLinFormerConfig, 64), (TLinFormer, TLinFormerConfig, 4),
     (TConstFormer, TConstFormerConfig, 4)],
    ids=["tlin-full-history", "tlin-short-history", "tconst-short-history"],
)
def test_matches_naive_reference_graph(cls, cfg_cls, w_oh):
    model = _model(cls, cfg_cls, n_embd=16, n_head=2, ffn_hidden=24, w_oh=w_oh, w_og=6)
    ids = torch.randint(0, 512, (20,))  # windows of 6: contexts of 6, 12, 18 tokens
    with torch.no_grad():
        ours = model(ids[None])[0]
        ref = _reference_logits(model, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_fused_attention_matches_naive():
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (5, 9, 9))
    for causal in (False, True):
        torch.testing.assert_close(attend(q, k, v, causal), naive_attention(q, k, v, causal))


# --------------------------------------------------------------------------- model properties


def test_paper_41m_parameter_parity():
    with torch.device("meta"):
        tlin = TLinFormer(TLinFormerConfig.from_name("paper-41m"))
        base = Transformer(TransformerConfig.from_name("paper-41m"))
    n_tlin = sum(p.numel() for p in tlin.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert n_tlin == n_base
    assert 40e6 < n_tlin < 42e6  # GPT-2 vocab (50257), tied embeddings
    assert tlin.config.n_layer == base.config.n_layer == 8


@pytest.mark.parametrize(("cls", "cfg_cls"), MODELS, ids=IDS)
def test_causality(cls, cfg_cls):
    model = _model(cls, cfg_cls)
    ids = torch.randint(0, 512, (1, 30))
    changed = ids.clone()
    t = 17
    changed[0, t] = (ids[0, t] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize(("cls", "cfg_cls"), MODELS, ids=IDS)
def test_save_load_same_logits(cls, cfg_cls, tmp_path):
    model = _model(cls, cfg_cls).float()
    save_checkpoint(tmp_path / "ck", model)
    loaded = load_checkpoint(tmp_path / "ck")
    assert type(loaded) is cls and loaded.config == model.config
    ids = torch.randint(0, 512, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("cfg_cls", [TLinFormerConfig, TConstFormerConfig, TransformerConfig])
def test_configs_presets_and_validation(cfg_cls):
    with pytest.raises(ValueError, match="valid: debug, small, paper-41m"):
        cfg_cls.from_name("nope")
    with pytest.raises(ValueError, match="divisible by n_head"):
        cfg_cls.from_name("debug", n_embd=30, n_head=4)
    cfg = cfg_cls.from_name("small")
    assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


def test_sampling_is_seeded():
    model = _model(TLinFormer, TLinFormerConfig)
    prompt = torch.randint(0, 512, (1, 3))
    a = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    b = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a, b) and a.shape == (1, 15)


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "cfg_cls"), MODELS, ids=IDS)
def test_cuda_bf16_cached_logits_match_forward(cls, cfg_cls):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = cls(cfg_cls.from_name("small")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 8192, (2, 600), device="cuda")
    with torch.no_grad():
        full = model(ids).float()
        cache = model.new_cache(2, 600)
        got = [model.prefill(ids[:, :300], cache)]
        got += [model.step(ids[:, t], cache) for t in range(300, 600)]
    stepped = torch.stack(got, dim=1).float()
    torch.testing.assert_close(stepped, full[:, 299:], rtol=0.05, atol=0.1)
