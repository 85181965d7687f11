"""Mount a new domain expert: corpus -> compressor + TLinFormer LM -> calibration -> registry.

Steps (each resumable; the training state lives in ``REGISTRY/.work/NAME/``):

1. build the corpus (``cir.data.build_dataset``) with the registry tokenizer. The first
   mount of an empty registry trains the tokenizer on its own corpus and installs it as
   the registry tokenizer; ``route-cli quickstart`` instead trains one on all its domains
   first, which gives every expert a fair vocabulary;
2. train the compressor (``cir.compressor.train.train_compressor``) and the LM
   (``cir.experts.train.train_expert``, TLinFormer); re-running an interrupted mount
   resumes both from their last checkpoint;
3. calibrate the OOD threshold on held-out (``val``) in-domain chunks
   (:func:`cir.router.routing.calibrate`);
4. register atomically (:meth:`Registry.add_expert`), then delete the work dir.

Refused before anything is written: a chunk length (``seq_len``) other than the mounted
experts' (they route the same chunks), and resuming an interrupted mount with another
source, preset, token budget or model shape than it started with (``RESUME_KEYS``, kept
in ``.work/NAME/mount.json``). A mount that fails before its corpus is built leaves no
work dir behind.

Existing experts are only read, never written. Two mounts of the same name exclude each
other through a per-name lock; mounts of different names run side by side.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
from cir.data.shards import read_manifest, shard_problems
from cir.router.registry import ExpertInfo, Registry, RegistryError, sha256_file
from cir.router.routing import DEFAULT_LOSS_MARGIN, DEFAULT_MARGIN, DEFAULT_QUANTILE, calibrate

# LM training settings per preset (the compressor has its own in cir.compressor.train).
LM_TRAIN: dict[str, dict[str, Any]] = {
    "debug": dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=1000,
                  ckpt_every=10, log_every=5),
    "small": dict(steps=300, batch_size=8, lr=1e-3, warmup_steps=20, eval_every=100,
                  ckpt_every=50, log_every=10),
}
LM_PRESET = {"debug": "debug", "small": "small"}
# What an interrupted mount must be resumed with (steps may change: more steps resume on).
RESUME_KEYS = ("source", "preset", "max_tokens", "vocab_size", "lm_arch",
               "compressor_overrides", "lm_overrides")
RESUME_FILE = "mount.json"

Event = Callable[[dict[str, Any]], None]


@dataclass
class MountConfig:
    preset: str = "small"
    max_tokens: int | None = 2_000_000
    steps_compressor: int | None = None
    steps_lm: int | None = None
    vocab_size: int | None = None  # only when this mount trains the registry tokenizer
    lm_arch: str = "tlinformer"
    calib_chunks: int = 256
    quantile: float = DEFAULT_QUANTILE
    margin: float = DEFAULT_MARGIN
    loss_margin: float = DEFAULT_LOSS_MARGIN
    device: str = "auto"
    seed: int = 0
    compressor_overrides: dict[str, Any] = field(default_factory=dict)  # model fields
    lm_overrides: dict[str, Any] = field(default_factory=dict)
    compressor_train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    lm_train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in LM_TRAIN:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(LM_TRAIN)}")
        for key in ("max_tokens", "steps_compressor", "steps_lm"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1, got {value}")
        if self.compressor_overrides:  # a wrong field fails here, before any corpus is built
            from cir.compressor.model import CompressorConfig

            CompressorConfig.from_name(self.preset, **self.compressor_overrides)


@dataclass
class MountResult:
    info: ExpertInfo
    timings: dict[str, float]
    resumed: bool


def _seq_len_and_vocab(preset: str) -> tuple[int, int]:
    from cir.compressor.model import CompressorConfig

    p = CompressorConfig.presets[preset]
    return int(p["seq_len"]), int(p["vocab_size"])


def chunk_len(cfg: MountConfig) -> int:
    """The chunk length (tokens) of the compressor this mount would train."""
    return int(cfg.compressor_overrides.get("seq_len") or _seq_len_and_vocab(cfg.preset)[0])


def mounted_chunk_lens(registry: Registry) -> dict[str, int]:
    """``{name: chunk length}`` of the mounted experts (unreadable ones left out)."""
    from cir.checkpoint import CheckpointError, read_config

    out = {}
    for name in registry.names():
        try:
            out[name] = int(read_config(registry.root / name / "compressor")[1].seq_len)
        except (CheckpointError, OSError):
            continue
    return out


def check_chunk_len(registry: Registry, name: str, cfg: MountConfig) -> None:
    """Refuse a chunk length other than the mounted experts': they score the same chunks."""
    lens = mounted_chunk_lens(registry)
    new = chunk_len(cfg)
    if not lens or new in lens.values():
        return
    used = sorted(set(lens.values()))
    presets = sorted({str(p) for n in lens if (p := _mounted_preset(registry, n))})
    as_preset = f" (preset {', '.join(presets)})" if presets else ""
    raise RegistryError(
        f"refusing {name}: preset {cfg.preset} chunks text in {new} tokens, the experts of "
        f"{registry.root} use {'/'.join(map(str, used))}{as_preset}; experts of one registry "
        "must share one chunk length (use that preset, or another --registry)"
    )


def _mounted_preset(registry: Registry, name: str) -> str | None:
    try:
        return (registry.info(name).meta.get("mount_config") or {}).get("preset")
    except RegistryError:
        return None


def _resume_record(source: Any, cfg: MountConfig) -> dict[str, Any]:
    """The inputs an interrupted mount must be resumed with, as JSON values."""
    if isinstance(source, str):
        src: Any = str(Path(source).resolve()) if Path(source).exists() else source
    else:
        src = [str(Path(s).resolve()) for s in source]
    rec = {"source": src, **{k: getattr(cfg, k) for k in RESUME_KEYS if k != "source"}}
    return json.loads(json.dumps(rec, sort_keys=True, default=str))


_FLAGS = {"source": "--source", "preset": "--preset", "max_tokens": "--max-tokens"}


def check_resume(work: Path, name: str, source: Any, cfg: MountConfig) -> None:
    """Refuse to resume ``work`` with inputs other than those it started with; record them."""
    path = work / RESUME_FILE
    new = _resume_record(source, cfg)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            diffs = [f"{_FLAGS.get(k, k)} {old.get(k)!r}, now {new[k]!r}"
                     for k in RESUME_KEYS if k in old and old[k] != new[k]]
            if diffs:
                raise RegistryError(
                    f"cannot resume the interrupted mount of {name!r} with other inputs "
                    f"({'; '.join(diffs)}): re-run it as before, or delete {work} to start over"
                )
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def _worth_resuming(work: Path) -> bool:
    """A built corpus or a training checkpoint: what a re-run would resume from."""
    return (work / "data" / "manifest.json").is_file() or any(
        (work / part).is_dir() and any((work / part).iterdir()) for part in ("compressor", "lm"))


def _dataset_ok(data_dir: Path, tokenizer_sha: str | None) -> bool:
    """Whether an interrupted mount's corpus can be reused (a missing or torn one is built
    again)."""
    try:
        manifest = read_manifest(data_dir)
    except (OSError, ValueError):
        return False
    if any(shard_problems(data_dir, split, manifest) for split in manifest["splits"]):
        return False
    return tokenizer_sha is None or manifest["tokenizer_sha256"] == tokenizer_sha


def build_corpus(registry: Registry, work: Path, source: Any, cfg: MountConfig) -> Path:
    """The domain's chunk dataset under ``work/data``, tokenized with the registry tokenizer."""
    from cir.data import build_dataset

    data = work / "data"
    seq_len, preset_vocab = _seq_len_and_vocab(cfg.preset)
    reg_sha = registry.tokenizer_hash() if registry.has_tokenizer() else None
    if not _dataset_ok(data, reg_sha):
        tok = registry.tokenizer_path if reg_sha else None
        build_dataset(data, source, tokenizer=tok, vocab_size=cfg.vocab_size or preset_vocab,
                      seq_len=seq_len, max_tokens=cfg.max_tokens, overwrite=True)
    if reg_sha is None:
        try:
            registry.set_tokenizer(data / "tokenizer.json")
        except RegistryError:  # another first mount installed its tokenizer meanwhile
            build_dataset(data, source, tokenizer=registry.tokenizer_path, seq_len=seq_len,
                          max_tokens=cfg.max_tokens, overwrite=True)
    return data


def _train_compressor(work: Path, data: Path, tok: Path, cfg: MountConfig, on_log: Event | None):
    from cir.compressor.train import default_train_config, train_compressor

    over = {"device": cfg.device, "seed": cfg.seed, **cfg.compressor_train}
    if cfg.steps_compressor:
        over["steps"] = cfg.steps_compressor
    return train_compressor(data, work / "compressor", preset=cfg.preset, tokenizer=tok,
                            train_cfg=default_train_config(cfg.preset, **over),
                            overrides=cfg.compressor_overrides, on_log=on_log)


def _train_lm(work: Path, data: Path, tok: Path, cfg: MountConfig, on_log: Event | None):
    from cir.experts.train import train_expert

    from cir.train import TrainConfig

    settings = {**LM_TRAIN[cfg.preset], "device": cfg.device, "seed": cfg.seed, **cfg.lm_train}
    if cfg.steps_lm:
        settings["steps"] = cfg.steps_lm
    return train_expert(data, work / "lm", arch=cfg.lm_arch, preset=LM_PRESET[cfg.preset],
                        tokenizer=tok, train_cfg=TrainConfig(**settings),
                        overrides=cfg.lm_overrides, on_log=on_log)


def held_out(data: Path, max_chunks: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_chunks`` chunks of ``split`` (falling back to ``test`` then ``train``)."""
    from cir.data import open_dataset

    for name in (split, "test", "train"):
        ds = open_dataset(data, name)
        if len(ds):
            return ds.get_batch(np.arange(min(len(ds), max_chunks)))
    raise ValueError(f"{data}: no chunks to calibrate on")


def _calibrate(work: Path, data: Path, cfg: MountConfig) -> dict[str, Any]:
    from cir.checkpoint import load_checkpoint

    model = load_checkpoint(work / "compressor", expect="compressor")
    ids, mask = held_out(data, cfg.calib_chunks)
    return calibrate(model, ids, mask, quantile=cfg.quantile, margin=cfg.margin,
                     loss_margin=cfg.loss_margin)


def _meta(source: Any, data: Path, cfg: MountConfig, results: dict[str, Any]) -> dict[str, Any]:
    manifest = read_manifest(data)
    return {
        "domain": results["name"],
        # as resumes compare it: a relative directory resolved, so it names the same files
        # whatever the current directory of a later `analyze` / `index build`
        "source": _resume_record(source, cfg)["source"],
        "corpus_fingerprint": sha256_file(data / "manifest.json"),
        "corpus": {k: manifest.get(k) for k in ("splits", "skipped", "seq_len", "vocab_size")},
        "mount_config": asdict(cfg),
        "train": {k: v for k, v in results.items() if k != "name"},
    }


def keep_corpus(registry: Registry, name: str, data: Path) -> None:
    """Keep the domain's dataset (its held-out splits serve evaluations) in ``.data/NAME``."""
    target = registry.data_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    data.replace(target)


def mount(
    registry: Registry,
    name: str,
    source: Any,
    cfg: MountConfig | None = None,
    on_event: Event | None = None,
) -> MountResult:
    """Build, train, calibrate and register expert ``name`` from ``source``."""
    cfg = cfg or MountConfig()
    work = registry.work_dir(name)
    registry.check_free(name)  # before training: mounted, or the name's path taken otherwise
    check_chunk_len(registry, name, cfg)
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(registry.mount_lock_path(name)), timeout=0):
            return _mount_locked(registry, name, source, cfg, work, on_event or (lambda e: None))
    except filelock.Timeout:
        raise RegistryError(f"a mount of {name!r} is already running in {registry.root}") from None


def _mount_locked(
    registry: Registry, name: str, source: Any, cfg: MountConfig, work: Path, emit: Event
) -> MountResult:
    registry.check_free(name)  # a concurrent mount may have finished while we waited
    check_chunk_len(registry, name, cfg)  # another mount may have finished meanwhile
    registry.cleanup()
    resumed = work.exists()
    check_resume(work, name, source, cfg)
    try:
        return _mount_steps(registry, name, source, cfg, work, emit, resumed)
    except BaseException:
        if work.is_dir() and not _worth_resuming(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _mount_steps(
    registry: Registry, name: str, source: Any, cfg: MountConfig, work: Path, emit: Event,
    resumed: bool,
) -> MountResult:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    emit({"stage": "corpus", "name": name})
    data = build_corpus(registry, work, source, cfg)
    timings["corpus_s"] = time.perf_counter() - t
    tok = registry.tokenizer_path

    def log(stage: str) -> Event:
        return lambda rec: emit({"stage": stage, "name": name, **rec})

    t = time.perf_counter()
    emit({"stage": "compressor", "name": name})
    comp = _train_compressor(work, data, tok, cfg, log("compressor"))
    timings["compressor_s"] = time.perf_counter() - t
    t = time.perf_counter()
    emit({"stage": "lm", "name": name})
    lm = _train_lm(work, data, tok, cfg, log("lm"))
    timings["lm_s"] = time.perf_counter() - t
    t = time.perf_counter()
    emit({"stage": "calibrate", "name": name})
    calibration = _calibrate(work, data, cfg)
    results = {"name": name, "compressor": {"steps": comp.step, "last": comp.last},
               "lm": {"steps": lm.step, "last": lm.last, "arch": cfg.lm_arch}}
    info = registry.add_expert(name, work / "compressor", work / "lm", calibration,
                               _meta(source, data, cfg, results))
    timings["calibrate_register_s"] = time.perf_counter() - t
    keep_corpus(registry, name, data)
    shutil.rmtree(work, ignore_errors=True)
    emit({"stage": "done", "name": name})
    return MountResult(info, timings, resumed)
