"""A compressor with a discrete bottleneck (``n_codes``): configs, the training loss
against a per-chunk reference, eval picking the encoder's code, and codes that learn the
clusters of their training domain."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _toy import Halves
from cir.compressor.model import (
    CodeLogits,
    Compressor,
    CompressorConfig,
    _code_loss,
    balanced_shares,
    loss_fn,
    sampled_loss_fn,
)
from cir.compressor.train import default_train_config, train_compressor
from safetensors.torch import load_file

from cir.checkpoint import load_checkpoint


def test_code_fields_are_checked_and_default_in_older_configs():
    cfg = CompressorConfig.from_name("debug")
    assert (cfg.n_codes, cfg.code_temperature) == (0, 0.01)
    saved = dataclasses.asdict(cfg)
    del saved["n_codes"], saved["code_temperature"]  # a config.json written before them
    assert CompressorConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match="n_codes must be 0"):
        CompressorConfig.from_name("debug", n_codes=1)
    with pytest.raises(ValueError, match="code_temperature must be > 0"):
        CompressorConfig.from_name("debug", n_codes=4, code_temperature=0.0)
    plain = Compressor(cfg)
    assert not any(name.startswith("code") for name, _ in plain.named_parameters())


def test_balanced_shares_split_the_batch_evenly():
    scores = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    r = balanced_shares(scores, iters=200)
    torch.testing.assert_close(r.sum(1), torch.ones(12))
    torch.testing.assert_close(r.sum(0), torch.full((4,), 3.0), atol=1e-4, rtol=0)
    # alike codes: an even split; one chunk preferring a code still leans towards it
    alike = balanced_shares(torch.zeros(6, 3))
    torch.testing.assert_close(alike, torch.full((6, 3), 1 / 3))
    tilt = torch.zeros(6, 3)
    tilt[0, 2] = 1.0
    assert balanced_shares(tilt)[0].argmax() == 2


def _reference_code_loss(out: CodeLogits, ids, mask):
    """The loop: each chunk's mean cross-entropy under each code, shares, and the pick."""
    B, C = out.choice.shape
    ce = torch.zeros(B, C)
    for b in range(B):
        real = mask[b].nonzero()[:, 0]
        for c in range(C):
            ce[b, c] = F.cross_entropy(out.per_code[c, real].float(), ids[b, real])
    n = mask.sum(1).float()
    w = n / n.sum()
    share = balanced_shares(-ce.detach() / out.temperature)
    objective = (w * (share * ce).sum(1)).sum() + F.nll_loss(out.choice, ce.argmin(1))
    pick = out.choice.argmax(1)
    return objective, (w * ce[torch.arange(B), pick]).sum()


def test_code_loss_matches_a_per_chunk_loop():
    g = torch.Generator().manual_seed(1)
    B, C, T, V = 5, 3, 7, 11
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    logits = torch.randn(C, T, V, generator=g, requires_grad=True)
    choice_logits = torch.randn(B, C, generator=g, requires_grad=True)
    out = CodeLogits(logits, F.log_softmax(choice_logits, -1), temperature=0.5)
    loss, stats = _code_loss(out, ids, mask)
    objective, picked = _reference_code_loss(out, ids, mask)
    torch.testing.assert_close(loss, picked)  # the value reported: the picked code's
    assert int(stats["n_targets"]) == int(mask.sum())
    got = torch.autograd.grad(loss, (logits, choice_logits), retain_graph=True)
    want = torch.autograd.grad(objective, (logits, choice_logits))  # the gradient: training's
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    pick = out.choice.argmax(1)
    hits = (logits.argmax(-1)[pick] == ids) & mask
    torch.testing.assert_close(stats["tra"], hits.sum() / mask.sum())


def test_eval_reconstructs_from_the_picked_code_alone():
    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=3), position_init="normal")
    with torch.no_grad():
        model.code_bias.normal_()  # every code distinct in its output shift too
    data = Halves(6, seed=2)
    ids, mask = data.get_batch(np.arange(6))
    model.train()
    out = model(ids, mask)  # training: every code's reconstruction
    assert isinstance(out, CodeLogits) and out.per_code.shape == (3, 32, 512)
    model.eval()
    with torch.no_grad():
        z = model.encode(ids, mask)
        pick = model.code_choice(z).argmax(-1)
        want = out.per_code.detach()[pick]  # [B, T, V]: eval reads the picked code only
        torch.testing.assert_close(model(ids, mask), want)
        scores = model.score(ids, mask)
        ce = F.cross_entropy(want.flatten(0, 1), ids.flatten(), reduction="none").view(6, 32)
        torch.testing.assert_close(scores.loss, (ce * mask).sum(1) / mask.sum(1))
        # the decoder is blind to the tokens: other inputs with the same pick, same logits
        other = torch.randint(2, 512, ids.shape)
        same = model.code_choice(model.encode(other, mask)).argmax(-1) == pick
        if same.any():
            torch.testing.assert_close(model(other, mask)[same], want[same])
    loss, _ = loss_fn(model, ids, mask)  # eval mode: the plain loss of the picked code
    torch.testing.assert_close(loss, F.cross_entropy(want[mask], ids[mask]))


def test_scoring_looks_codes_up_exactly_as_it_decodes_each_chunk(monkeypatch):
    """``score`` decodes the C codes once and looks each chunk up; the same figures as
    decoding every chunk's picked code, with padding, short chunks and few chunks."""
    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=4), position_init="normal")
    model.eval()
    with torch.no_grad():
        model.code_bias.normal_()
    ids = torch.randint(2, 512, (11, 20))  # shorter than seq_len 32
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[3, 12:] = False
    mask[7, 1:] = False
    ids[~mask] = 0
    decoded = []
    orig = Compressor._code_tables
    monkeypatch.setattr(Compressor, "_code_tables",
                        lambda self, T: decoded.append(T) or orig(self, T))
    fast = model.score(ids, mask, batch_size=4)
    assert decoded == [20]  # one decoder pass over the codes for the whole call
    with torch.no_grad():
        logits = model(ids, mask).float()  # eval: each chunk decodes its picked code
        assert model.code_choice(model.encode(ids, mask)).argmax(-1).unique().numel() > 1
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(11, 20)
    torch.testing.assert_close(fast.loss, (ce * mask).sum(1) / mask.sum(1))
    want_correct = ((logits.argmax(-1) == ids) & mask).sum(1)
    assert torch.equal(fast.n_correct, want_correct) and torch.equal(fast.n_tokens, mask.sum(1))
    few = model.score(ids[:3], mask[:3])  # fewer chunks than codes: decoded per chunk
    assert decoded == [20]
    torch.testing.assert_close(few.loss, fast.loss[:3])
    monkeypatch.setattr(Compressor, "CODE_TABLE_BYTES", 0)  # tables over budget: per chunk
    slow = model.score(ids, mask)
    assert decoded == [20]
    torch.testing.assert_close(slow.loss, fast.loss)
    assert torch.equal(slow.n_correct, fast.n_correct)


def test_scoring_flops_of_a_coded_model_are_its_encoders():
    from cir.router.baselines import flops_per_chunk

    plain = Compressor(CompressorConfig.from_name("small"))
    coded = Compressor(CompressorConfig.from_name("small", n_codes=8))
    c = plain.config
    assert plain.scoring_flops() == pytest.approx(plain.flops_per_token() / 3 * c.seq_len)
    S = c.seq_len + c.n_latents
    one_layer = 2 * S * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff + 2 * S * c.d_model)
    assert coded.scoring_flops() == pytest.approx(c.n_enc_layers * one_layer, rel=1e-3)
    # small: the decoder and the LM head over 8192 tokens are 3/4 of a plain chunk's cost
    assert coded.scoring_flops() < plain.scoring_flops() / 4
    both = flops_per_chunk("reconstruction", [plain, coded], None, 10, 2, 64)
    assert both == pytest.approx(plain.scoring_flops() + coded.scoring_flops())


def test_latent_routers_pay_for_the_encoder_alone():
    """Mahalanobis and kNN read latents: their FLOPs are the encoder's layers, by hand,
    and do not grow with the vocabulary (the LM head is the decoder's)."""
    from cir.router.baselines import flops_per_chunk

    for vocab in (512, 8192):
        model = Compressor(CompressorConfig.from_name("small", vocab_size=vocab))
        c = model.config
        S = c.seq_len + c.n_latents
        one_layer = 2 * S * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff + 2 * S * c.d_model)
        assert model.encoder_flops() == pytest.approx(c.n_enc_layers * one_layer)
        maha = flops_per_chunk("mahalanobis", [model], None, 100, 3, 512)
        assert maha == pytest.approx(c.n_enc_layers * one_layer + 3 * 2.0 * 512 * 513)
        knn = flops_per_chunk("knn-latent", [model], None, 100, 3, 512)
        assert knn == pytest.approx(c.n_enc_layers * one_layer + 2.0 * 100 * 512)


def test_codes_learn_the_clusters_of_their_domain(tmp_path):
    """Two codes on chunks from two disjoint vocabularies: each half gets its own code,
    whose reconstruction spreads over that half's 48 tokens (log 48 nats, against the
    log 96 of a unigram of both halves)."""
    data = Halves(256, seed=3)
    cfg = default_train_config("debug", steps=150, device="cpu", lr=1e-2)
    train_compressor(data, tmp_path / "c", preset="debug", train_cfg=cfg,
                     overrides={"n_codes": 2, "code_temperature": 0.01})
    model = load_checkpoint(tmp_path / "c")
    assert model.config.n_codes == 2
    test = Halves(64, seed=4)
    ids, mask = test.get_batch(np.arange(64))
    with torch.no_grad():
        pick = model.eval().code_choice(model.encode(ids, mask)).argmax(-1).numpy()
    assert set(pick[test.half == 0]) == {pick[0]} and set(pick[test.half == 1]) == {1 - pick[0]}
    loss = model.score(ids, mask).loss.mean().item()
    assert loss == pytest.approx(math.log(48), abs=0.3) and loss < math.log(96) - 0.4


def test_code_model_resume_equals_uninterrupted(tmp_path):
    data = Halves(64, seed=5)
    kw = dict(preset="debug", overrides={"n_codes": 3}, loss_fraction=0.5)
    cfg = default_train_config("debug", steps=20, device="cpu")
    train_compressor(data, tmp_path / "full", train_cfg=cfg, **kw)
    assert train_compressor(data, tmp_path / "cut", train_cfg=cfg, stop_at=9, **kw).step == 9
    assert train_compressor(data, tmp_path / "cut", train_cfg=cfg, **kw).resumed_from == 9
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert "code_bias" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_positions_use_the_same_code_loss():
    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=2))
    ids, mask = Halves(4, seed=6).get_batch(np.arange(4))
    torch.manual_seed(7)
    loss, stats = sampled_loss_fn(0.5)(model.train(), ids, mask)
    torch.manual_seed(7)
    pos = torch.randperm(32)[:16].sort().values
    want, _ = _code_loss(model(ids, mask, pos), ids[:, pos], mask[:, pos])
    torch.testing.assert_close(loss, want)
    assert int(stats["n_targets"]) == int(mask[:, pos].sum())
