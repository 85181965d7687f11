"""Compressor model: shapes, padding, decoder blindness, checkpoints, presets, scoring."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cir.compressor.model import Compressor, CompressorConfig, loss_fn, sampled_loss_fn

from cir.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _model(seed: int = 0, **overrides) -> Compressor:
    torch.manual_seed(seed)
    return Compressor(CompressorConfig.from_name("debug", **overrides)).eval()


def _batch(cfg: CompressorConfig, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (B, cfg.seq_len), generator=g)
    lengths = torch.tensor([cfg.seq_len, cfg.seq_len // 2, 5])[:B]
    mask = torch.arange(cfg.seq_len)[None, :] < lengths[:, None]  # padding at the tail
    return ids.masked_fill(~mask, 0), mask


def test_shapes():
    m = _model()
    c = m.config
    ids, mask = _batch(c)
    z = m.encode(ids, mask)
    assert z.shape == (3, c.n_latents, c.d_model)
    assert m.decode(z).shape == (3, c.seq_len, c.vocab_size)
    assert m(ids, mask).shape == (3, c.seq_len, c.vocab_size)
    short = m(ids[:, :10], mask[:, :10])
    assert short.shape == (3, 10, c.vocab_size)
    s = m.score(ids, mask, return_latents=True)
    assert s.loss.shape == s.tra.shape == s.n_tokens.shape == s.n_correct.shape == (3,)
    assert s.latents.shape == z.shape
    assert s.n_tokens.tolist() == mask.sum(1).tolist()


def test_too_long_chunk_is_an_error():
    m = _model()
    ids = torch.ones(1, m.config.seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_len"):
        m.encode(ids, torch.ones_like(ids, dtype=torch.bool))


def test_padding_is_masked():
    m = _model()
    ids, mask = _batch(m.config)
    other = ids.clone()
    other[~mask] = torch.randint(2, m.config.vocab_size, (int((~mask).sum()),))
    a, b = m.score(ids, mask, return_latents=True), m.score(other, mask, return_latents=True)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    assert torch.equal(a.tra, b.tra) and torch.equal(a.n_correct, b.n_correct)
    la, _ = loss_fn(m, ids, mask)
    lb, _ = loss_fn(m, other, mask)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)


def test_short_chunk_equals_padded_chunk():
    m = _model()
    ids, mask = _batch(m.config)
    T = 16
    full = m.score(ids[1:2], mask[1:2], return_latents=True)  # 16 real tokens, padded
    cut = m.score(ids[1:2, :T], mask[1:2, :T], return_latents=True)
    torch.testing.assert_close(full.latents, cut.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(full.loss, cut.loss, rtol=0, atol=1e-5)


def test_decoder_is_blind_to_input_tokens():
    m = _model()
    ids, mask = _batch(m.config)
    z = m.encode(ids, mask)
    ref = m.decode(z)
    calls = []
    hook = m.tok_emb.register_forward_hook(lambda *args: calls.append(1))
    m.decode(z)
    hook.remove()
    assert not calls  # token ids enter only through the embedding lookup, never in decode
    other_ids = torch.randint(2, m.config.vocab_size, ids.shape)
    _ = m.encode(other_ids, mask)  # encoding something else leaves no state behind
    torch.testing.assert_close(m.decode(z), ref, rtol=0, atol=0)
    assert not torch.allclose(m.encode(other_ids, mask), z)


def test_score_matches_naive_reference():
    m = _model()
    ids, mask = _batch(m.config)
    s = m.score(ids, mask, batch_size=2)  # batched in two passes
    with torch.no_grad():
        logits = m(ids, mask)
    for b in range(ids.shape[0]):
        real = mask[b]
        ce = F.cross_entropy(logits[b][real], ids[b][real])
        acc = (logits[b][real].argmax(-1) == ids[b][real]).float().mean()
        torch.testing.assert_close(s.loss[b], ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.tra[b], acc)



def test_score_counts_ties_as_argmax_does(monkeypatch):
    """Tied logits: a token is right only where it is the first maximum, as with argmax."""
    m = _model()
    ids, mask = _batch(m.config)
    ids[0, :4] = torch.tensor([1, 2, 3, 2])
    logits = torch.zeros(ids.shape[0], m.config.seq_len, m.config.vocab_size)
    logits[0, :4, 2:4] = 1.0  # tokens 2 and 3 tie for the maximum; argmax says 2
    monkeypatch.setattr(m, "decode", lambda z, positions=None: logits)
    s = m.score(ids, mask)
    hits = (logits.argmax(-1) == ids) & mask
    assert hits[0, :4].tolist() == [False, True, False, True]
    torch.testing.assert_close(s.n_correct, hits.sum(1))

def test_score_precision():
    """auto is fp32 on CPU (identical to fp32); bf16 runs the model under bf16 autocast:
    the losses move by bf16 rounding only, the latents come back as fp32."""
    m = _model()
    ids, mask = _batch(m.config)
    fp32, auto = m.score(ids, mask, precision="fp32"), m.score(ids, mask)
    assert torch.equal(fp32.loss, auto.loss) and torch.equal(fp32.n_correct, auto.n_correct)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(m(ids, mask).float()[0], ids[0])  # chunk 0 has no padding
    bf16 = m.score(ids, mask, precision="bf16", return_latents=True)
    torch.testing.assert_close(bf16.loss[0], ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(bf16.loss, fp32.loss)
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.02, atol=0.02)
    assert bf16.latents.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        m.score(ids, mask, precision="fp16")


def test_empty_chunk_scores_nan():
    m = _model()
    ids = torch.zeros(1, m.config.seq_len, dtype=torch.long)
    s = m.score(ids, torch.zeros_like(ids, dtype=torch.bool))
    assert s.n_tokens.item() == 0 and torch.isnan(s.loss).all() and torch.isnan(s.tra).all()


def test_loss_fn_matches_score():
    m = _model()
    ids, mask = _batch(m.config)
    loss, metrics = loss_fn(m, ids, mask)
    s = m.score(ids, mask)
    pooled = (s.loss * s.n_tokens).sum() / s.n_tokens.sum()
    torch.testing.assert_close(loss, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["tra"], s.n_correct.sum() / s.n_tokens.sum())


def test_save_load_identical(tmp_path):
    m = _model()
    ids, mask = _batch(m.config)
    save_checkpoint(tmp_path / "ck", m)
    loaded = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded, Compressor) and loaded.config == m.config
    a, b = m.score(ids, mask, return_latents=True), loaded.score(ids, mask, return_latents=True)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.loss, b.loss)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["kind"] == "compressor"
    cfg["config"]["bogus"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus"):
        load_checkpoint(tmp_path / "ck")


def test_paper_parameter_count_on_meta():
    with torch.device("meta"):
        m = Compressor(CompressorConfig.from_name("paper"))
    assert all(p.is_meta for p in m.parameters())
    n = m.num_params()
    assert abs(n - 87e6) <= 2e6, n
    assert m.config.d_model == 512 and m.config.seq_len == 512 and m.config.n_latents == 8


def test_presets_and_validation():
    with pytest.raises(ValueError, match="valid: debug, small, base, paper"):
        CompressorConfig.from_name("huge")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        CompressorConfig.from_name("debug", d_model=33)
    with pytest.raises(ValueError, match="vocab_size"):
        CompressorConfig.from_name("debug", vocab_size=2)
    with pytest.raises(ValueError, match="dropout"):
        CompressorConfig.from_name("debug", dropout=1.0)
    with pytest.raises(ValueError, match="no fields"):
        CompressorConfig.from_name("debug", n_layers=3)
    c = CompressorConfig.from_name("small", vocab_size=1000)
    assert CompressorConfig.from_dict(c.to_dict()) == c
    d = c.to_dict()
    del d["d_ff"]
    with pytest.raises(ValueError, match="missing fields"):
        CompressorConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown fields"):
        CompressorConfig.from_dict({**c.to_dict(), "extra": 1})


def test_dropout_only_in_training():
    m = _model(dropout=0.5)
    ids, mask = _batch(m.config)
    a, b = m.score(ids, mask), m.score(ids, mask)
    assert torch.equal(a.loss, b.loss)
    assert not m.training


def test_positions_restrict_the_head_only():
    m = _model()
    ids, mask = _batch(m.config)
    pos = torch.tensor([0, 3, 7, 20])
    full = m(ids, mask)
    torch.testing.assert_close(m(ids, mask, pos), full[:, pos], rtol=1e-5, atol=1e-5)


def test_sampled_loss():
    m = _model()
    ids, mask = _batch(m.config)
    assert sampled_loss_fn(1.0) is loss_fn
    with pytest.raises(ValueError, match="fraction"):
        sampled_loss_fn(0.0)
    fn = sampled_loss_fn(0.25)
    exact, _ = loss_fn(m, ids, mask)
    torch.testing.assert_close(fn(m, ids, mask)[0], exact)  # eval mode: exact loss
    m.train()
    torch.manual_seed(0)
    draws = torch.stack([fn(m, ids, mask)[0] for _ in range(100)])
    assert draws.std() > 0  # different positions each call
    # unbiased up to the token weighting of a batch: the mean lands near the exact loss
    assert abs(draws.mean() - exact) < 0.05 * exact
    torch.manual_seed(1)
    a = fn(m, ids, mask)[0]
    torch.manual_seed(1)
    assert torch.equal(a, fn(m, ids, mask)[0])  # positions come from the global RNG


def test_sinusoids_reference():
    """Against the closed form: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    from cir.compressor.model import sinusoids

    d = 6
    table = sinusoids(50, d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoids(3, 5).shape == (3, 5)  # odd width: a last unpaired sine column


def test_position_init_scales():
    """Encoder positions at the token embeddings' scale, decoder position queries at the
    latents' (LayerNorm outputs), every position distinct, neighbours closer than far ones."""
    cfg = CompressorConfig.from_name("debug", d_model=64, n_heads=2, seq_len=64)
    m = Compressor(cfg)  # sinusoid by default
    d = m.config.d_model
    tok_norm = m.tok_emb.weight.norm(dim=1).mean().item()
    torch.testing.assert_close(m.enc_pos.norm(dim=1), torch.ones(64))
    assert tok_norm == pytest.approx(1.0, rel=0.1)
    torch.testing.assert_close(m.pos_queries.norm(dim=1), torch.full((64,), (d / 2) ** 0.5))
    q = F.normalize(m.pos_queries.detach(), dim=1)
    cos = q @ q.T  # [S, S]
    assert (cos - torch.eye(64)).max() < 0.99  # no two positions alike
    assert cos[10, 11] > cos[10, 40]


def test_position_init_normal_reference():
    """``normal``: every 2-D parameter drawn in order from the documented N(0, std), the
    position tables at 0.02 (the same draws with the same seed: a bit-for-bit reference)."""
    cfg = CompressorConfig.from_name("debug")
    m, ref = Compressor(cfg), Compressor(cfg)
    torch.manual_seed(5)
    m.reset_parameters("normal")
    d = cfg.d_model
    stds = {"tok_emb.weight": d**-0.5, "latent_queries": 0.02, "enc_pos": 0.02,
            "pos_queries": 0.02}
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape) * stds.get(name, p.shape[1] ** -0.5))
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=name)
    with pytest.raises(ValueError, match="position_init"):
        Compressor(cfg, position_init="learned")


def test_presets_pick_their_position_init(monkeypatch):
    """CPU presets keep N(0, 0.02) positions, GPU-sized ones start sinusoidal."""
    from cir.compressor import train as ctrain

    seen = []
    monkeypatch.setattr(ctrain, "Compressor", lambda cfg, position_init: seen.append(
        position_init))
    for preset in ("debug", "small", "base", "paper"):
        ctrain.build_compressor(preset)
    assert seen == ["normal", "normal", "sinusoid", "sinusoid"]
