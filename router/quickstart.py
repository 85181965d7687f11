"""Quickstart: a working registry from built-in local corpora in a minute or two of CPU.

1. domains: ``python-code`` and ``python-docs`` (present wherever Python is), plus
   ``c-code`` (``/usr/include``) or else ``man-pages`` when the machine has them;
2. one registry tokenizer (byte-level BPE, ``QUICK_VOCAB`` tokens) trained on a sample of
   every domain's train split, so no domain is favoured by the vocabulary;
3. each domain mounted with the ``QUICK`` settings: ``small``-preset chunking (512 tokens)
   with narrower models and a few dozen steps, each training stage also capped in wall
   time, so a 2-core CPU finishes in minutes;
4. sample inputs scored: a Python file, a prose file, a mixed prose + code file, random
   bytes (skipped as binary) and random characters (routed by loss, flagged by the
   tokenizer check: see docs/router.md).

A second run finds the experts mounted and reuses them (``force`` rebuilds from scratch).
"""

from __future__ import annotations

import random
import shutil
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir.router.mount import MountConfig, mount
from cir.router.registry import Registry, RegistryError

SAMPLES_DIR = Path(__file__).parent / "samples"
QUICK_VOCAB = 2048
TOKENIZER_BYTES_PER_DOMAIN = 1_500_000
QUICK = dict(
    preset="small",
    max_tokens=300_000,
    calib_chunks=64,
    compressor_overrides=dict(d_model=64, n_heads=2, n_enc_layers=1, n_dec_layers=1, d_ff=256),
    lm_overrides=dict(n_embd=64, n_head=4, n_blocks=1, n_hidden=1, ffn_hidden=192),
    compressor_train=dict(steps=200, batch_size=8, lr=3e-3, warmup_steps=8, eval_every=1000,
                          ckpt_every=50, log_every=5, max_wall_s=70.0),
    lm_train=dict(steps=16, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=1000,
                  ckpt_every=8, log_every=4, max_wall_s=20.0),
)

Event = Callable[[dict[str, Any]], None]


@dataclass
class QuickstartResult:
    registry: Path
    domains: list[str]
    mounted: list[str] = field(default_factory=list)  # mounted by this run
    reused: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (expert, why not loaded)


def quick_domains() -> list[str]:
    """The built-in domains of this machine: two Python ones plus one system corpus."""
    from cir.data.sources import SOURCES

    domains = [d for d in ("python-code", "python-docs") if SOURCES[d].present()]
    for extra in ("c-code", "man-pages"):
        if SOURCES[extra].present():
            domains.append(extra)
            break
    if len(domains) < 2:
        raise RuntimeError(f"quickstart needs two built-in corpora, found {domains}")
    return domains


def _sample_texts(domain: str, max_bytes: int) -> Iterator[str]:
    from cir.data import iter_documents, split_of

    total = 0
    for doc in iter_documents(domain):
        if split_of(doc.id) != "train":
            continue
        yield doc.text
        total += len(doc.text)
        if total >= max_bytes:
            return


def ensure_tokenizer(reg: Registry, domains: list[str]) -> bool:
    """Train the registry tokenizer on all ``domains`` unless it has one; True if trained."""
    if reg.has_tokenizer():
        return False
    from cir.data import save_tokenizer, train_tokenizer

    texts = [t for d in domains for t in _sample_texts(d, TOKENIZER_BYTES_PER_DOMAIN)]
    random.Random(0).shuffle(texts)
    tok = train_tokenizer(texts, vocab_size=QUICK_VOCAB)
    reg.root.mkdir(parents=True, exist_ok=True)
    tmp = save_tokenizer(tok, reg.root / ".work" / "quickstart-tokenizer.json")
    reg.set_tokenizer(tmp)
    tmp.unlink()
    return True


def write_samples(out: Path) -> list[Path]:
    """The committed samples plus generated random bytes and random characters."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("sample.py", "sample.txt", "sample_mixed.md"):
        shutil.copyfile(SAMPLES_DIR / name, out / name)
        paths.append(out / name)
    rng = random.Random(0)
    (out / "random.bin").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    (out / "random.txt").write_text("".join(rng.choice(chars) for _ in range(3000)))
    return paths + [out / "random.bin", out / "random.txt"]


def reset(reg: Registry) -> None:
    """Unmount every expert and drop the tokenizer and work files (``--force``)."""
    for name in reg.names():
        reg.remove(name)
    for sub in (".work", ".data"):
        shutil.rmtree(reg.root / sub, ignore_errors=True)
    reg.tokenizer_path.unlink(missing_ok=True)


def quickstart(
    registry: str | Path | None = None,
    force: bool = False,
    samples_dir: Path | None = None,
    on_event: Event | None = None,
    domains: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
) -> QuickstartResult:
    """Build (or reuse) the quickstart registry, then score the samples.

    ``domains`` (expert name -> source) and ``settings`` (``MountConfig`` fields) replace
    the built-in domains and the ``QUICK`` settings."""
    from cir.data import load_tokenizer
    from cir.router.score import score_paths

    emit = on_event or (lambda e: None)
    reg = Registry(registry)
    if force:
        reset(reg)
    domains = domains or {d: d for d in quick_domains()}
    res = QuickstartResult(reg.root, list(domains))
    t0 = time.perf_counter()
    if ensure_tokenizer(reg, list(domains.values())):
        res.timings["tokenizer_s"] = time.perf_counter() - t0
    for name, source in domains.items():
        if name in reg:
            res.reused.append(name)
            continue
        t = time.perf_counter()
        mount(reg, name, source, MountConfig(**(settings or QUICK)), on_event=emit)
        res.mounted.append(name)
        res.timings[f"mount_{name}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loaded = reg.load(list(domains))
    res.errors = loaded.errors
    if not loaded.experts:
        raise RegistryError(
            f"no usable expert in {reg.root} ({'; '.join(e for _, e in loaded.errors)}); "
            "run `route-cli quickstart --force` to rebuild"
        )
    res.samples = write_samples(samples_dir or reg.root / ".samples")
    res.reports = score_paths(res.samples, loaded.experts, load_tokenizer(reg.tokenizer_path))
    res.timings["score_s"] = time.perf_counter() - t
    res.timings["total_s"] = time.perf_counter() - t0
    return res
