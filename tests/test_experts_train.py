"""Expert training through the shared trainer, and per-chunk perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cir.experts.evaluate import dataset_perplexity, perplexity
from cir.experts.registry import build_model
from cir.experts.train import lm_loss, train_expert

from cir.checkpoint import load_checkpoint
from cir.train import TrainConfig


class PatternChunks:
    """In-memory chunks with a learnable pattern (next = current + 1) and tail padding."""

    vocab_size = 64
    seq_len = 32

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        start = rng.integers(2, self.vocab_size, size=(n, 1))
        self.ids = 2 + (start + np.arange(self.seq_len)) % (self.vocab_size - 2)
        self.lengths = rng.integers(self.seq_len // 2, self.seq_len + 1, size=n)

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mask = np.arange(self.seq_len)[None] < self.lengths[idx][:, None]
        ids = np.where(mask, self.ids[idx], 0)
        return torch.from_numpy(ids).long(), torch.from_numpy(mask)


def _cfg(steps: int = 40) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, log_every=5,
                       eval_every=steps, ckpt_every=steps, eval_batches=2, device="cpu")


def _losses(out_dir) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("event") == "train"]


@pytest.mark.parametrize("arch", ["tlinformer", "tconstformer", "transformer"])
def test_training_reduces_loss_on_synthetic_chunks(arch, tmp_path):
    torch.manual_seed(0)
    data = PatternChunks()
    result = train_expert(data, tmp_path / arch, arch=arch, preset="debug", train_cfg=_cfg(),
                          val_data=PatternChunks(16, seed=1))
    losses = _losses(tmp_path / arch)
    assert result.step == 40
    assert losses[-1] < 0.7 * losses[0]
    model = load_checkpoint(tmp_path / arch)
    assert model.config.vocab_size == 64 and model.config.seq_len == 32


def test_training_reduces_loss_on_tiny_dataset(request, tmp_path):
    try:
        dataset = request.getfixturevalue("tiny_dataset")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_dataset fixture is not available")
    train_expert(dataset, tmp_path / "tlin", arch="tlinformer", preset="debug",
                 train_cfg=_cfg(30), overrides={"seq_len": 64})
    losses = _losses(tmp_path / "tlin")
    assert losses[-1] < losses[0]


def test_perplexity_matches_the_training_loss():
    torch.manual_seed(0)
    model = build_model("tlinformer", "debug", vocab_size=64, seq_len=32).double().eval()
    data = PatternChunks(10)
    ids, mask = data.get_batch(np.arange(10))
    out = perplexity(model, ids, mask, batch_size=3)
    assert out["nll_sum"].shape == out["n_tokens"].shape == (10,)
    assert torch.equal(out["n_tokens"], mask[:, 1:].sum(-1))  # padding is only at the tail
    with torch.no_grad():
        loss, _ = lm_loss(model, ids, mask)
    mean = out["nll_sum"].sum() / out["n_tokens"].sum()
    assert float(mean) == pytest.approx(float(loss), rel=1e-6)  # lm_loss works in fp32
    # chunk-by-chunk: the same numbers whatever the batch size
    one = perplexity(model, ids[:1], mask[:1])
    assert float(one["nll_sum"][0]) == pytest.approx(float(out["nll_sum"][0]), rel=1e-9)


def test_dataset_perplexity_of_a_model():
    torch.manual_seed(0)
    model = build_model("transformer", "debug", vocab_size=64, seq_len=32)
    res = dataset_perplexity(model, PatternChunks(12), max_chunks=7, batch_size=4)
    assert res["n_chunks"] == 7 and res["nll_sum"].shape == (7,)
    assert res["ppl"] == pytest.approx(math.exp(res["nll_per_token"]))
    assert 32 < res["ppl"] < 200  # an untrained model is near uniform over 64 tokens
