"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

A checkpoint is loadable from its directory alone. Weights are read with safetensors only,
never unpickled; ``config.json`` is validated strictly against the model's config dataclass
(unknown or missing fields are an error naming them).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# kind -> "module:Class"; imported lazily so loading a compressor never imports the experts.
MODEL_KINDS: dict[str, str] = {
    "compressor": "cir.compressor.model:Compressor",
    "tlinformer": "cir.experts.tlinformer:TLinFormer",
    "tconstformer": "cir.experts.tconstformer:TConstFormer",
    "transformer": "cir.experts.transformer:Transformer",
}
# what a command may need a checkpoint to be -> the kinds that are one
ROLES: dict[str, tuple[str, ...]] = {
    "compressor": ("compressor",),
    "language model": ("tlinformer", "tconstformer", "transformer"),
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with the reason."""


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)
}


def check_field_types(cls: type, values: dict[str, Any]) -> None:
    """ValueError naming the first of ``values`` whose type does not fit ``cls``'s field
    (int, float, bool and str fields; a bool is not a number here)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        want, v = _FIELD_TYPES.get(name), values[f.name]
        if want and not (isinstance(v, want) and (name == "bool" or not isinstance(v, bool))):
            raise ValueError(f"{cls.__name__}.{f.name} must be {name}, got {v!r}")


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass, refusing unknown or missing fields and wrong types."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{cls.__name__}: the config must be a JSON object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown fields {unknown}")
        if missing:
            parts.append(f"missing fields {missing}")
        raise CheckpointError(f"{cls.__name__}: " + "; ".join(parts))
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        check_field_types(cls, fixed)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return cls(**fixed)


def check_tokenizer(ckpt: str | os.PathLike, dataset: Any) -> None:
    """CheckpointError when ``dataset``'s ids come from another tokenizer than the one
    saved with checkpoint ``ckpt`` (the numbers would be meaningless, or an index error)."""
    from cir.data.tokenizer import tokenizer_hash

    saved = Path(ckpt) / TOKENIZER_FILE
    built = (getattr(dataset, "manifest", None) or {}).get("tokenizer_sha256")
    if built and saved.is_file() and tokenizer_hash(saved) != built:
        where = getattr(dataset, "root", "the dataset")
        raise CheckpointError(
            f"{where} was built with another tokenizer than {ckpt}'s; rebuild it with "
            f"`route-cli data build ... --tokenizer {saved}`"
        )


def model_class(kind: str) -> type[nn.Module]:
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; valid: {', '.join(MODEL_KINDS)}")
    module_name, cls_name = MODEL_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(directory: Path, model: nn.Module) -> None:
    payload = {"kind": model.kind, "config": config_to_dict(model.config)}
    atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write weights atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(unwrap(model), str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    tokenizer: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` (with ``.kind`` and ``.config``) as a checkpoint directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    write_config(directory, model)
    save_weights(directory / WEIGHTS_FILE, model, metadata)
    if (
        tokenizer is not None
        and Path(tokenizer).resolve() != (directory / TOKENIZER_FILE).resolve()
    ):
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    return directory


def read_config(directory: str | Path) -> tuple[str, Any]:
    """Return ``(kind, config)`` from ``config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    try:
        payload = json.loads(path.read_text())
        kind, raw = payload["kind"], payload["config"]
    except (ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{path}: malformed config ({exc})") from None
    config_class = model_class(kind).config_class
    # a class's own from_dict: it may give fields added since a config was saved defaults;
    # a registered model whose config class has none gets the strict loader
    load = getattr(config_class, "from_dict", None) or (lambda d: config_from_dict(config_class, d))
    try:
        return kind, load(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def weights_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def weights_file(path: str | Path) -> Path:
    """The weights of a checkpoint directory, or ``path`` itself (a ``.safetensors`` file)."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def saved_step(path: str | Path) -> int:
    """The training step weights were saved at (their ``step`` metadata; 0 when they do
    not say), for a checkpoint directory or a ``.safetensors`` file."""
    weights = weights_file(path)
    step = weights_metadata(weights).get("step", "0")
    if not step.isdigit():
        raise CheckpointError(f"{weights}: metadata step {step!r} is not a step number")
    return int(step)


def check_role(directory: str | Path, kind: str, expect: str) -> None:
    """``CheckpointError`` unless a checkpoint of ``kind`` is a ``expect`` (a key of
    ``ROLES``)."""
    if kind not in ROLES[expect]:
        raise CheckpointError(f"{directory}: a {kind} checkpoint, not a {expect}")


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", expect: str | None = None
) -> nn.Module:
    """Load a model from its checkpoint directory, strictly, without unpickling anything.
    ``expect`` (a key of ``ROLES``) refuses a checkpoint of another kind, before its
    weights are read."""
    directory = Path(directory)
    kind, config = read_config(directory)
    if expect is not None:
        check_role(directory, kind, expect)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE}")
    model = model_class(kind)(config)
    load_weights(model, weights)
    return model.to(device).eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model`` strictly: every tensor present, none extra,
    shapes equal. Dtypes may differ (bf16 weights load into an fp32 model)."""
    try:
        missing, unexpected = load_model(unwrap(model), str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())  # one line: torch's errors span several
        raise CheckpointError(f"{path}: cannot load weights ({reason})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
