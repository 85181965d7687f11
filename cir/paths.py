"""Where generated things live: ``$CIR_HOME`` (default ``~/.cache/compression-routing``)."""

from __future__ import annotations

import os
from pathlib import Path


def cir_home() -> Path:
    """Root for corpora, tokenizers, checkpoints, registries and plots."""
    root = os.environ.get("CIR_HOME") or Path.home() / ".cache" / "compression-routing"
    return Path(root).expanduser()


def datasets_dir() -> Path:
    return cir_home() / "datasets"


def runs_dir() -> Path:
    return cir_home() / "runs"


def default_registry() -> Path:
    return cir_home() / "registry"
