"""Training and checkpoint edge cases (foreign states, stale configs, cosine resumes, pooled
validation, no clipping, seeded initialisation) and FLOP counts against a FLOP counter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _toy import ArrayChunks, Toy, ToyConfig, toy_loss
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from cir import checkpoint
from cir.train import TrainConfig, evaluate, train

checkpoint.MODEL_KINDS.setdefault("toy", "_toy:Toy")


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, log_every=2, eval_every=6,
                ckpt_every=4, eval_batches=2, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("content", [b"", b"not a torch file" * 8, "pickle", "list", "nostep"])
def test_a_foreign_training_state_is_a_one_line_checkpoint_error(tmp_path, content):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=4)
    state = tmp_path / "train_state.pt"
    if content == "pickle":  # a pickled object the weights-only unpickler refuses
        torch.save({"step": 4, "path": Path("x")}, state)
    elif content == "list":
        torch.save([1, 2, 3], state)
    elif content == "nostep":
        torch.save({"foo": 1}, state)
    else:
        state.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable training state"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg())


def test_a_config_json_that_is_not_text_is_a_checkpoint_error(tmp_path):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=4)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match="malformed config"):
        checkpoint.load_checkpoint(tmp_path)


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_stale_config(tmp_path):
    def stop(rec):
        if rec.get("event") == "train" and rec["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(Toy(ToyConfig(d_model=16)), toy_loss, ArrayChunks(), tmp_path, _cfg(), on_log=stop)
    train(Toy(ToyConfig(d_model=8)), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=8)
    assert checkpoint.load_checkpoint(tmp_path).config.d_model == 8
    res = train(Toy(ToyConfig(d_model=8)), toy_loss, ArrayChunks(), tmp_path, _cfg())
    assert res.resumed_from == 8 and res.step == 12


def test_weights_without_a_training_state_are_not_trained_over(tmp_path):
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "run", _cfg())
    saved = checkpoint.save_checkpoint(tmp_path / "model", checkpoint.load_checkpoint(tmp_path / "run"),
                                       metadata={"step": "12"})
    before = load_file(str(saved / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="init-from"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), saved, _cfg(steps=20), stop_at=4)
    after = load_file(str(saved / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_changing_steps_of_a_cosine_run_mid_way_is_refused(tmp_path):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=8)
    with pytest.raises(checkpoint.CheckpointError, match="cosine"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(steps=24))


def test_validation_figures_are_pooled_over_tokens():
    torch.manual_seed(0)
    model, val = Toy(ToyConfig()), ArrayChunks(n=10, seed=1)  # batches of 8 and 2 chunks
    got = evaluate(model, toy_loss, val, TrainConfig(batch_size=8, eval_batches=4),
                   torch.device("cpu"))["val_loss"]
    ids, _ = val.get_batch(np.arange(10))
    with torch.no_grad():
        pooled = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert got == pytest.approx(pooled, rel=1e-5)


def test_grad_clip_zero_means_no_clipping(tmp_path):
    torch.manual_seed(0)
    off = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "a",
                _cfg(steps=40, grad_clip=0.0, log_every=40))
    assert off.last["loss"] < 5.0  # trains (all-zero gradients left it near log(32) + drift)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)


def test_expert_initialisation_follows_the_seed(tmp_path):
    from cir.data.shards import open_dataset
    from cir.experts.train import train_expert

    data = open_dataset("random", "train", vocab_size=512, seq_len=64)

    def init(seed, name, noise):
        torch.manual_seed(noise)  # whatever the process's RNG was before
        cfg = TrainConfig(steps=1, batch_size=2, lr=1e-30, warmup_steps=0, weight_decay=0.0,
                          seed=seed, device="cpu")
        train_expert(data, tmp_path / name, arch="transformer", preset="debug", train_cfg=cfg)
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b, c = init(0, "a", 1), init(0, "b", 2), init(1, "c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _matmul_flops(model, loss_fn, T, batch=1):
    ids = torch.randint(2, 100, (batch, T))
    with FlopCounterMode(display=False) as fc:  # CPU fused attention is not counted
        loss_fn(model, ids, torch.ones_like(ids, dtype=torch.bool))[0].backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("arch", ["tlinformer", "tconstformer"])
def test_windowed_flops_per_token_counts_the_context_stream(arch):
    from cir.experts.registry import build_model
    from cir.experts.train import lm_loss

    model = build_model(arch, "debug")
    T = model.config.seq_len
    matmuls = _matmul_flops(model, lm_loss, T + 1) / T
    assert matmuls <= model.flops_per_token() <= 1.2 * matmuls


def test_compressor_flops_per_token_follows_the_loss_fraction():
    from cir.compressor.model import Compressor, CompressorConfig, sampled_loss_fn

    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug")).train()
    c = model.config
    attn = 6.0 * (c.n_enc_layers + c.n_dec_layers) * 2 * (c.seq_len + c.n_latents) ** 2 * c.d_model / c.seq_len
    fn = sampled_loss_fn(0.25)
    assert fn.loss_fraction == 0.25
    matmuls = _matmul_flops(model, fn, c.seq_len) / c.seq_len
    assert model.flops_per_token(0.25) - attn == pytest.approx(matmuls, rel=0.05)
    assert model.flops_per_token(0.25) < model.flops_per_token()


def test_coded_compressor_flops_per_token_count_one_decoder_pass_per_code():
    from cir.compressor.model import Compressor, CompressorConfig, loss_fn

    torch.manual_seed(0)
    model = Compressor(CompressorConfig.from_name("debug", n_codes=2)).train()
    c, B = model.config, 8
    S = c.seq_len + c.n_latents
    # CPU fused attention is not counted: leave it out, the decoder's for 2 codes of 8 chunks
    attn = 6.0 * 2 * S * S * c.d_model / c.seq_len * (c.n_enc_layers + c.n_dec_layers * 2 / B)
    matmuls = _matmul_flops(model, loss_fn, c.seq_len, batch=B) / (B * c.seq_len)
    assert model.flops_per_token(batch_size=B) - attn == pytest.approx(matmuls, rel=0.05)
    plain_decoding = model.flops_per_token()  # as if every chunk were decoded
    assert model.flops_per_token(batch_size=B) < plain_decoding
