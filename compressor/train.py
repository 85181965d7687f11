"""Train a compressor on a chunk dataset with the shared trainer (``cir.train.train``).

The model's vocabulary and chunk length follow the dataset (its tokenizer), so a
compressor's losses are comparable token for token with every other model of the same
registry. Re-running the same call resumes from ``out_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cir.compressor.model import Compressor, CompressorConfig, sampled_loss_fn

from cir.train import TrainConfig, TrainResult, train

# Per-preset training defaults: what the preset was sized for.
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "debug": dict(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20,
                  ckpt_every=20, log_every=5),
    # the reference's 4 minutes on 2 CPU cores (loss on a quarter of the positions): a
    # coded step costs 2/3 of a continuous one, whose 4 minutes were 970 steps. With
    # n_codes=0, 1,000 steps at lr 3e-3 (longer runs adapt to any input and route worse;
    # docs/results/cpu-compressor.md, "Routing")
    "small": dict(steps=1450, batch_size=16, lr=6e-3, warmup_steps=30, eval_every=500,
                  ckpt_every=100, log_every=10, weight_decay=0.0),
    "base": dict(steps=20_000, batch_size=64, lr=6e-4, warmup_steps=500),
    # the recipe of the GPU runs (docs/results/gpu-tra.md): constant 5e-4 after a short
    # warmup, linear decay over the last 20%; extend a run in its constant phase at will
    "paper": dict(steps=50_000, batch_size=64, lr=5e-4, warmup_steps=300, schedule="wsd",
                  eval_every=1000, ckpt_every=1000),
}


# Share of positions the training loss is taken on (the LM head dominates small models).
_LOSS_FRACTION: dict[str, float] = {"debug": 1.0, "small": 0.25, "base": 1.0, "paper": 1.0}


def loss_fraction_for(preset: str, loss_fraction: float | None = None) -> float:
    """``loss_fraction`` when given, else the share of positions ``preset`` trains on."""
    return _LOSS_FRACTION.get(preset, 1.0) if loss_fraction is None else loss_fraction

# How the position tables start (Compressor.reset_parameters): sinusoids take a model that
# learns to reconstruct off the unigram plateau sooner (paper on one H100: 74% val TRA at
# step 10,000 instead of 63.5%), but slow the CPU presets, which stay bags of tokens
# within their budget (small: val CE 6.24 instead of 5.95 after 2,000 steps).
POSITION_INIT: dict[str, str] = {"debug": "normal", "small": "normal", "base": "sinusoid",
                                 "paper": "sinusoid"}


def default_train_config(preset: str, **overrides: Any) -> TrainConfig:
    """The training settings a preset is meant to be trained with (plus overrides)."""
    if preset not in _TRAIN_DEFAULTS:
        raise ValueError(
            f"unknown compressor preset {preset!r}; valid: {', '.join(_TRAIN_DEFAULTS)}"
        )
    return TrainConfig(**{**_TRAIN_DEFAULTS[preset], **overrides})


def open_split(data: Any, split: str) -> Any:
    """``data`` as a ``ChunkDataset``: opened by name or directory, or returned as is; a
    list or tuple of names or directories is their ``split``s end to end (``ConcatChunks``)."""
    from cir.data.shards import join_chunks, open_dataset

    if isinstance(data, (list, tuple)):
        return join_chunks([open_split(d, split) for d in data], split)
    if not isinstance(data, (str, Path)):
        return data
    return open_dataset(str(data), split)


def _val_split(data: Any) -> Any:
    from cir.data.shards import join_chunks

    if isinstance(data, (list, tuple)):
        parts = [v for v in (_val_split(d) for d in data) if v is not None]
        return join_chunks(parts, "val") if parts else None
    if not isinstance(data, (str, Path)):
        return None
    try:
        ds = open_split(data, "val")
    except (FileNotFoundError, ValueError):
        return None
    return ds if len(ds) > 0 else None


def tokenizer_path(data: Any) -> Path | None:
    """The ``tokenizer.json`` a dataset was built with, when it says where it is."""
    for attr in ("tokenizer_path", "tokenizer_file"):
        value = getattr(data, attr, None)
        if isinstance(value, (str, Path)) and Path(value).is_file():
            return Path(value)
    for attr in ("root", "path", "directory"):
        value = getattr(data, attr, None)
        if isinstance(value, (str, Path)) and (Path(value) / "tokenizer.json").is_file():
            return Path(value) / "tokenizer.json"
    return None


def build_compressor(preset: str, data: Any = None, **overrides: Any) -> Compressor:
    """A fresh compressor of ``preset`` sized to ``data`` (vocab_size, seq_len), its
    position tables started the way the preset trains best (``POSITION_INIT``)."""
    fields: dict[str, Any] = {}
    for name in ("vocab_size", "seq_len"):
        value = getattr(data, name, None)
        if isinstance(value, int):
            fields[name] = value
    fields.update(overrides)
    return Compressor(CompressorConfig.from_name(preset, **fields),
                      position_init=POSITION_INIT.get(preset, "sinusoid"))


def train_compressor(
    data: Any,
    out_dir: str | Path,
    *,
    preset: str = "small",
    tokenizer: str | Path | None = None,
    train_cfg: TrainConfig | None = None,
    overrides: dict[str, Any] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    val_data: Any = None,
    stop_at: int | None = None,
    loss_fraction: float | None = None,
    init_from: str | Path | None = None,
    refit_codes: bool = True,
) -> TrainResult:
    """Train a ``preset`` compressor on ``data`` (dataset name, directory or opened
    ``ChunkDataset``, or a list of names or directories trained on together); validation
    on their ``val`` splits when there are any. ``stop_at``
    ends early after that step, checkpoint included (as a kill would). ``loss_fraction``
    takes the training loss on that share of positions (default: the preset's); keep it
    the same when resuming. ``init_from``: continue from a checkpoint's weights with a
    fresh optimizer (``cir.train.train``; ignored once ``out_dir`` holds a checkpoint).
    ``refit_codes``: a coded compressor's output shifts are refitted to its training
    chunks once training is done (``refit_saved_codes``)."""
    train_data = open_split(data, "train")
    cfg = train_cfg or default_train_config(preset)
    torch_seed_model(cfg.seed)
    model = build_compressor(preset, train_data, **(overrides or {}))
    if model.config.n_codes and not model.config.code_balance:
        model.init_code_bias(seed_chunk_counts(train_data, model.config, cfg.seed))
    fraction = loss_fraction_for(preset, loss_fraction)
    result = train(
        model,
        sampled_loss_fn(fraction),
        train_data,
        out_dir,
        cfg,
        val_data=open_split(val_data, "val") if val_data is not None else _val_split(data),
        tokenizer=tokenizer or tokenizer_path(train_data),
        on_log=on_log,
        stop_at=stop_at,
        init_from=init_from,
    )
    if (refit_codes and model.config.n_codes and not result.stopped_early
            and _is_main_process()):
        refit_saved_codes(model, train_data, result.out_dir, result.step)
    return result


# training chunks the codes are refitted to after training (evenly spread; 2M tokens of 512)
REFIT_CHUNKS = 4096
# the weights' metadata key that says their codes were refitted (with the refit's figures)
REFIT_KEY = "codes_refit"


def refit_saved_codes(model: Any, train_data: Any, out_dir: str | Path, step: int,
                      max_chunks: int = REFIT_CHUNKS) -> dict[str, Any] | None:
    """Refit a coded compressor's output shifts to its training chunks
    (``Compressor.refit_codes``) and save the weights with the refit's figures in their
    metadata; ``None`` without doing anything when the saved weights already say so, so
    re-running a finished command changes nothing."""
    import json

    from cir.compressor.evaluate import pick_chunks

    from cir.checkpoint import WEIGHTS_FILE, save_weights, weights_metadata

    path = Path(out_dir) / WEIGHTS_FILE
    if REFIT_KEY in weights_metadata(path):
        return None
    ids, mask = train_data.get_batch(pick_chunks(len(train_data), max_chunks))
    info = model.refit_codes(ids, mask)
    save_weights(path, model, metadata={"step": str(step), REFIT_KEY: json.dumps(info)})
    return info


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a process launched alone."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def seed_chunk_counts(data: Any, config: CompressorConfig, seed: int) -> Any:
    """Token counts ``[n_codes, V]`` of ``n_codes`` distinct training chunks drawn with
    ``seed``, where each code's output shift starts (``init_code_bias``)."""
    import numpy as np
    import torch
    from cir.compressor.evaluate import token_bags

    if len(data) < config.n_codes:
        raise ValueError(f"{config.n_codes} codes need at least as many training chunks; "
                         f"the data has {len(data)}")
    idx = np.random.default_rng(seed).choice(len(data), size=config.n_codes, replace=False)
    ids, mask = data.get_batch(np.sort(idx))
    return torch.from_numpy(token_bags(ids, mask, config.vocab_size).toarray())


def torch_seed_model(seed: int) -> None:
    """Model initialisation is a function of the run's seed (so resuming rebuilds it)."""
    import torch

    torch.manual_seed(seed)
