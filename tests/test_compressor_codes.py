"""A compressor with a discrete bottleneck (``n_codes``): configs, the training loss
against a per-chunk reference, eval and scoring under each chunk's best code, and codes that learn the
clusters of their training domain."""

from __future__ import annotations

import dataclasses
import json
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
from cir.compressor.train import (
    REFIT_KEY,
    default_train_config,
    refit_saved_codes,
    seed_chunk_counts,
    train_compressor,
)
from safetensors.torch import load_file

from cir.checkpoint import load_checkpoint, weights_metadata


def test_checkpoints_saved_before_the_code_fields_load(tmp_path):
    """A config.json written before ``n_codes``, ``code_temperature`` or ``code_balance``
    existed loads (the fields take their defaults) to the same model."""
    from cir.checkpoint import save_checkpoint

    for name, cfg in (("plain", CompressorConfig.from_name("debug")),
                      ("coded", CompressorConfig.from_name("debug", n_codes=3))):
        model = Compressor(cfg)
        save_checkpoint(tmp_path / name, model)
        path = tmp_path / name / "config.json"
        payload = json.loads(path.read_text())
        for field in (("code_balance",) if cfg.n_codes else
                      ("n_codes", "code_temperature", "code_balance")):
            del payload["config"][field]
        path.write_text(json.dumps(payload))
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.config == cfg
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                     model.state_dict().values(), strict=True))
    payload["config"]["no_such_field"] = 1  # still strict about fields it never had
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="no_such_field"):
        load_checkpoint(tmp_path / "coded")


def test_code_fields_are_checked_and_default_in_older_configs():
    cfg = CompressorConfig.from_name("debug")
    assert (cfg.n_codes, cfg.code_temperature) == (0, 0.01)
    assert cfg.code_balance
    saved = dataclasses.asdict(cfg)
    del saved["n_codes"], saved["code_temperature"]  # a config.json written before them
    del saved["code_balance"]
    assert CompressorConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match="n_codes must be 0"):
        CompressorConfig.from_name("debug", n_codes=1)
    with pytest.raises(ValueError, match="code_temperature must be > 0"):
        CompressorConfig.from_name("debug", n_codes=4, code_temperature=0.0)
    plain = Compressor(cfg)
    assert not any(name.startswith("code") for name, _ in plain.named_parameters())
    # `small` is coded now; a `small` saved before the code fields stays continuous
    small = CompressorConfig.from_name("small")
    assert (small.n_codes, small.code_balance) == (8, False)
    old_small = dataclasses.asdict(CompressorConfig.from_name("small", n_codes=0))
    del old_small["n_codes"], old_small["code_temperature"], old_small["code_balance"]
    assert CompressorConfig.from_dict(old_small).n_codes == 0


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
    fit = -ce.detach() / out.temperature
    share = balanced_shares(fit) if out.balanced else torch.softmax(fit, 1)
    objective = (w * (share * ce).sum(1)).sum() + F.nll_loss(out.choice, ce.argmin(1))
    pick = out.choice.argmax(1)
    return objective, (w * ce[torch.arange(B), pick]).sum()


@pytest.mark.parametrize("balanced", [True, False])
def test_code_loss_matches_a_per_chunk_loop(balanced):
    g = torch.Generator().manual_seed(1)
    B, C, T, V = 5, 3, 7, 11
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    logits = torch.randn(C, T, V, generator=g, requires_grad=True)
    choice_logits = torch.randn(B, C, generator=g, requires_grad=True)
    out = CodeLogits(logits, F.log_softmax(choice_logits, -1), temperature=0.5,
                     balanced=balanced)
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


def _per_code_losses(model, ids, mask):
    """Reference: ``[C, B]`` mean cross-entropy of each chunk under each code's full
    reconstruction, by F.cross_entropy on every (code, chunk) pair."""
    with torch.no_grad():
        per_code = model.code_logits()[:, : ids.shape[1]].float()  # [C, T, V]
    out = torch.zeros(per_code.shape[0], len(ids))
    for c in range(per_code.shape[0]):
        for b in range(len(ids)):
            ce = F.cross_entropy(per_code[c], ids[b], reduction="none")
            out[c, b] = ce[mask[b]].mean()
    return out


def test_eval_reconstructs_each_chunk_from_its_best_code():
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
    ref = _per_code_losses(model, ids, mask)  # [C, B]
    best = ref.argmin(0)
    assert best.unique().numel() > 1  # the chunks do not all share one code
    with torch.no_grad():
        assert torch.equal(model.best_codes(ids, mask), best)
        want = out.per_code.detach()[best]  # [B, T, V]: eval reads the best code only
        torch.testing.assert_close(model(ids, mask), want)
        scores = model.score(ids, mask)
        torch.testing.assert_close(scores.loss, ref.min(0).values)
        # the encoder's pick: ``reconstruct`` from latents alone, and score(codes="encoder")
        z = model.encode(ids, mask)
        pick = model.code_choice(z).argmax(-1)
        assert not torch.equal(pick, best)  # an untrained encoder guesses wrong
        torch.testing.assert_close(model.reconstruct(z), out.per_code.detach()[pick])
        named = model.score(ids, mask, codes="encoder")
        torch.testing.assert_close(named.loss, ref[pick, torch.arange(6)])
        assert (scores.loss <= named.loss + 1e-6).all()
        # the decoder is blind to the tokens: a chunk changed within its best code's
        # support keeps the code, and then the same logits
        other = ids.clone()
        other[:, ::2] = ids[:, 1::2]  # a chunk's own tokens, moved
        same = model.best_codes(other, mask) == best
        assert same.any()
        torch.testing.assert_close(model(other, mask)[same], want[same])
    loss, _ = loss_fn(model, ids, mask)  # eval mode: the plain loss of the best code
    torch.testing.assert_close(loss, F.cross_entropy(want[mask], ids[mask]))
    with pytest.raises(ValueError, match="codes must be"):
        model.score(ids, mask, codes="nearest")
    with pytest.raises(ValueError, match="needs a compressor with n_codes"):
        Compressor(CompressorConfig.from_name("debug")).best_codes(ids, mask)


def test_scoring_looks_codes_up_exactly_as_it_decodes_each_chunk(monkeypatch):
    """``score`` decodes the C codes once per call and looks each chunk up, without the
    encoder; the same figures as the per-pair reference, with padding, short chunks, an
    empty chunk and fewer chunks than codes, and one code at a time past the table budget."""
    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=4), position_init="normal")
    model.eval()
    with torch.no_grad():
        model.code_bias.normal_()
    ids = torch.randint(2, 512, (11, 20))  # shorter than seq_len 32
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[3, 12:] = False
    mask[7, 1:] = False
    mask[9] = False  # empty: NaN scores
    ids[~mask] = 0
    decoded, encoded = [], []
    orig = Compressor._code_tables
    monkeypatch.setattr(Compressor, "_code_tables",
                        lambda self, T, codes=slice(None): decoded.append(codes) or orig(self, T, codes))
    orig_encode = Compressor.encode
    monkeypatch.setattr(Compressor, "encode",
                        lambda self, *a: encoded.append(1) or orig_encode(self, *a))
    fast = model.score(ids, mask, batch_size=4)
    assert decoded == [slice(None)] and not encoded  # one decoder pass, no encoder
    ref = _per_code_losses(model, ids, mask)
    keep = mask.any(1)
    torch.testing.assert_close(fast.loss[keep], ref.min(0).values[keep])
    assert fast.loss[9].isnan() and fast.tra[9].isnan()
    with torch.no_grad():
        logits = model(ids, mask).float()  # eval: each chunk decodes its best code
    want_correct = ((logits.argmax(-1) == ids) & mask).sum(1)
    assert torch.equal(fast.n_correct, want_correct) and torch.equal(fast.n_tokens, mask.sum(1))
    few = model.score(ids[:3], mask[:3])  # fewer chunks than codes
    torch.testing.assert_close(few.loss, fast.loss[:3])
    with_latents = model.score(ids, mask, return_latents=True)
    assert encoded and with_latents.latents.shape == (11, 4, 32)
    torch.testing.assert_close(with_latents.loss, fast.loss, equal_nan=True)
    decoded.clear()
    monkeypatch.setattr(Compressor, "CODE_TABLE_BYTES", 0)  # over budget: one code at a time
    slow = model.score(ids, mask, batch_size=4)
    assert decoded == [slice(c, c + 1) for c in range(4)] * 3  # per code, per batch
    torch.testing.assert_close(slow.loss, fast.loss, equal_nan=True)
    assert torch.equal(slow.n_correct, fast.n_correct)
    slow_named = model.score(ids, mask, codes="encoder")
    monkeypatch.setattr(Compressor, "CODE_TABLE_BYTES", 1 << 30)
    torch.testing.assert_close(slow_named.loss, model.score(ids, mask, codes="encoder").loss,
                               equal_nan=True)


def test_scoring_flops_of_a_coded_model_are_lookups():
    from cir.router.baselines import flops_per_chunk

    plain = Compressor(CompressorConfig.from_name("small", n_codes=0))
    coded = Compressor(CompressorConfig.from_name("small", n_codes=8))
    c = plain.config
    assert plain.scoring_flops() == pytest.approx(plain.flops_per_token() / 3 * c.seq_len)
    # one addition per code and position; no encoder, decoder or LM head per chunk
    assert coded.scoring_flops() == 8 * c.seq_len
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


def test_free_shares_train_each_chunks_best_codes():
    """Without balance, a batch that every chunk fits best with code 0 trains code 0 most
    (each chunk's shares are its own softmax: 0.77 / 0.23 here); balanced shares hand
    code 1 half of the batch."""
    ids = torch.zeros(4, 3, dtype=torch.long)
    mask = torch.ones(4, 3, dtype=torch.bool)
    per_code = torch.zeros(2, 3, 5)
    per_code[0, :, 0] = 2.0  # code 0 gives token 0 more mass: a better fit for every chunk
    trained = {}
    for balanced in (True, False):
        logits = per_code.clone().requires_grad_(True)
        out = CodeLogits(logits, F.log_softmax(torch.zeros(4, 2), -1), 1.0, balanced)
        (grad,) = torch.autograd.grad(_code_loss(out, ids, mask)[0], logits)
        trained[balanced] = grad[:, :, 0].sum(1)  # [C] each code's pull on token 0
    ce = torch.tensor([math.log(1 + 4 * math.exp(-2.0)), math.log(5.0)])
    free = torch.softmax(-ce, 0)  # each chunk's shares without balance
    # d(share * CE)/d(logit of token 0), CE a mean over the 3 positions: -share * (1 - p0)
    p0 = torch.tensor([math.exp(2.0) / (math.exp(2.0) + 4), 0.2])
    torch.testing.assert_close(trained[False], -free * (1 - p0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trained[True], -0.5 * (1 - p0), rtol=1e-3, atol=1e-6)


def test_unbalanced_codes_start_at_distinct_chunks():
    data = Halves(40, seed=8)
    cfg = CompressorConfig.from_name("debug", n_codes=3, code_balance=False)
    counts = seed_chunk_counts(data, cfg, seed=5)
    assert counts.shape == (3, 512)
    assert torch.equal(counts, seed_chunk_counts(data, cfg, seed=5))  # a function of the seed
    assert not torch.equal(counts, seed_chunk_counts(data, cfg, seed=6))
    lengths = sorted(int(n) for n in counts.sum(1))
    idx = np.random.default_rng(5).choice(40, size=3, replace=False)
    assert lengths == sorted(int(data.lengths[i]) for i in idx)  # three distinct chunks
    model = Compressor(cfg)
    model.init_code_bias(counts)
    want = ((counts.double() + 1) / (counts.double() + 1).sum(1, keepdim=True)).log()
    torch.testing.assert_close(model.code_bias.double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="need"):
        model.init_code_bias(counts[:2])
    with pytest.raises(ValueError, match="at least as many training chunks"):
        seed_chunk_counts(Halves(2, seed=1), cfg, seed=0)
    with pytest.raises(ValueError, match="n_codes"):
        Compressor(CompressorConfig.from_name("debug")).init_code_bias(counts)


def _position_blind(model: Compressor) -> Compressor:
    """Every position query alike: each code's logits are the same at every position."""
    with torch.no_grad():
        model.pos_queries.copy_(model.pos_queries[:1].expand_as(model.pos_queries))
    return model


def test_refit_codes_is_the_add_one_unigram_of_each_codes_chunks():
    """With logits alike at every position the refit is exact in one round: each code's
    reconstruction is the add-one unigram of the chunks its encoder picks, counted by
    hand; the picks and the decoder do not move, and a code nobody picks keeps its shift."""
    torch.manual_seed(0)
    model = _position_blind(Compressor(CompressorConfig.from_name("debug", n_codes=3)))
    with torch.no_grad():
        model.code_bias.normal_()
    data = Halves(48, seed=9, empty=(5,))
    ids, mask = data.get_batch(np.arange(48))
    model.eval()
    with torch.no_grad():
        picks = model.code_choice(model.encode(ids, mask)).argmax(-1)
        before = model.code_bias.clone()
        decoder = {k: v.clone() for k, v in model.state_dict().items() if k != "code_bias"}
    info = model.refit_codes(ids, mask)
    real = mask.bool().any(1)
    assert info["chunks"] == int(real.sum()) == 47
    assert info["code_use"] == torch.bincount(picks[real], minlength=3).tolist()
    logp = F.log_softmax(model.code_logits().float(), -1)  # [C, T, V]
    for c in range(3):
        mine = (picks == c) & real
        if not mine.any():
            torch.testing.assert_close(model.code_bias[c], before[c])
            continue
        counts = np.bincount(ids[mine][mask[mine].bool()].numpy(), minlength=512) + 1.0
        want = torch.from_numpy(np.log(counts / counts.sum())).float()
        for t in (0, 17, 31):
            torch.testing.assert_close(logp[c, t], want, rtol=0, atol=1e-4)
        assert info["rounds"][c] <= 2
    with torch.no_grad():
        assert torch.equal(model.code_choice(model.encode(ids, mask)).argmax(-1), picks)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in decoder.items())
    with pytest.raises(ValueError, match="n_codes"):
        Compressor(CompressorConfig.from_name("debug")).refit_codes(ids, mask)


def test_refit_codes_matches_observed_counts_where_positions_differ():
    """With logits that depend on the position, the refit is the maximum-likelihood shift:
    the tokens each code expects over its chunks' positions are the add-one counts seen
    there (the likelihood's gradient in the shift is zero), and refitting again moves
    nothing."""
    torch.manual_seed(1)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=2), position_init="sinusoid")
    data = Halves(40, seed=10)
    ids, mask = data.get_batch(np.arange(40))
    info = model.refit_codes(ids, mask, iters=200, tol=1e-7)
    with torch.no_grad():
        picks = model.code_choice(model.encode(ids, mask)).argmax(-1)
        probs = F.softmax(model.code_logits().double(), -1)  # [C, T, V]
    for c in range(2):
        mine = picks == c
        if not mine.any():
            continue
        per_position = mask[mine].sum(0).double()  # [T]
        expected = torch.einsum("t,tv->v", per_position, probs[c])
        counts = torch.bincount(ids[mine][mask[mine].bool()], minlength=512).double() + 1.0
        torch.testing.assert_close(expected, counts * per_position.sum() / counts.sum(),
                                   rtol=1e-4, atol=1e-6)
    assert max(info["rounds"]) > 1  # positions differ: more than the one exact round
    again = model.code_bias.clone()
    model.refit_codes(ids, mask, iters=200, tol=1e-7)
    torch.testing.assert_close(model.code_bias, again, rtol=0, atol=1e-5)


def test_training_refits_the_codes_once(tmp_path):
    """A coded run ends with its codes refitted to the training chunks, said in the weights'
    metadata; re-running the finished command changes no byte; a run stopped early is
    not refitted until it finishes."""
    data = Halves(64, seed=11)
    cfg = default_train_config("debug", steps=12, device="cpu")
    kw = dict(preset="debug", overrides={"n_codes": 2, "code_balance": False}, train_cfg=cfg)
    cut = train_compressor(data, tmp_path / "c", stop_at=6, **kw)
    assert cut.stopped_early
    assert REFIT_KEY not in weights_metadata(tmp_path / "c" / "model.safetensors")
    train_compressor(data, tmp_path / "c", **kw)
    meta = weights_metadata(tmp_path / "c" / "model.safetensors")
    assert meta["step"] == "12" and REFIT_KEY in meta
    assert json.loads(meta[REFIT_KEY])["chunks"] == 64
    first = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert train_compressor(data, tmp_path / "c", **kw).step == 12
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == first
    model = load_checkpoint(tmp_path / "c")
    assert refit_saved_codes(model, data, tmp_path / "c", 12) is None
    # the saved shifts are the refit of the saved model: refitting them again moves nothing
    ids, mask = data.get_batch(np.arange(64))
    saved = model.code_bias.clone()
    model.refit_codes(ids, mask)
    torch.testing.assert_close(model.code_bias, saved, rtol=0, atol=1e-3)
