"""Shared fixtures: a tiny deterministic corpus, a tokenizer and datasets built from it.

Session-scoped and built once: ``tiny_corpus`` (``code/`` and ``prose/`` sub-dirs of small
files), ``tiny_tokenizer`` (tokenizer.json, vocab 512), ``tiny_dataset`` (code, seq_len 64)
and ``tiny_prose_dataset`` (prose, seq_len 64). Every test runs with ``CIR_HOME`` in a
temporary directory, so nothing touches the user's cache.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 512
TINY_SEQ_LEN = 64
N_FILES = 30

_NAMES = ["alpha", "beta", "gamma", "delta", "count", "total", "items", "value", "node", "path",
          "width", "height", "cache", "index", "buffer", "result", "weight", "score", "token", "state"]
_OPS = ["+", "-", "*", "//", "%"]
_WORDS = ("the a an river mountain city quiet light morning evening old new small large people "
          "walked spoke wrote read found carried gave across under over near through with without "
          "slowly gently bright dark warm cold story letter garden window road market season "
          "because although while when after before and but so yet history music language").split()


def _python_file(rng: random.Random, k: int) -> str:
    lines = [f'"""Module {k}: helpers for {rng.choice(_NAMES)} handling."""', "", "import math", ""]
    for f in range(rng.randint(2, 5)):
        a, b = rng.sample(_NAMES, 2)
        lines += [
            f"def {a}_{b}_{f}({a}, {b}=None):",
            f'    """Return the {a} combined with {b}."""',
            f"    if {b} is None:",
            f"        {b} = {rng.randint(0, 99)}",
            f"    for i in range({rng.randint(2, 9)}):",
            f"        {a} = {a} {rng.choice(_OPS)} {b} {rng.choice(_OPS)} i",
            f"    return math.floor({a})",
            "",
        ]
    lines += ["", "class " + rng.choice(_NAMES).title() + f"Box{k}:", "    def __init__(self, size):",
              "        self.size = size", "        self.items = [0] * size", ""]
    return "\n".join(lines)


def _prose_file(rng: random.Random, k: int) -> str:
    paragraphs = []
    for _ in range(rng.randint(2, 4)):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        paragraphs.append(" ".join(sentences))
    return f"Chapter {k}\n\n" + "\n\n".join(paragraphs) + "\n"


def make_tiny_corpus(root: Path, n_files: int = N_FILES, seed: int = 0) -> Path:
    """Write ``n_files`` Python files under ``root/code`` and prose files under ``root/prose``."""
    rng = random.Random(seed)
    for k in range(n_files):
        sub = f"pkg{k % 3}"
        (root / "code" / sub).mkdir(parents=True, exist_ok=True)
        (root / "code" / sub / f"mod_{k:02d}.py").write_text(_python_file(rng, k))
        (root / "prose" / sub).mkdir(parents=True, exist_ok=True)
        (root / "prose" / sub / f"essay_{k:02d}.txt").write_text(_prose_file(rng, k))
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls
    (up to 60x slower with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cir_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("cir-home")
    monkeypatch.setenv("CIR_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cir.data.sources import iter_documents
    from cir.data.tokenizer import save_tokenizer, train_tokenizer

    texts = (doc.text for doc in iter_documents(str(tiny_corpus)))
    tok = train_tokenizer(texts, vocab_size=TINY_VOCAB)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer.json")


def _build(corpus: Path, tokenizer: Path, out: Path) -> Path:
    from cir.data.shards import build_dataset

    build_dataset(out, str(corpus), tokenizer=tokenizer, seq_len=TINY_SEQ_LEN)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_corpus / "code", tiny_tokenizer, tmp_path_factory.mktemp("tiny-data") / "tiny-code")


@pytest.fixture(scope="session")
def tiny_prose_dataset(tiny_corpus: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_corpus / "prose", tiny_tokenizer, tmp_path_factory.mktemp("tiny-data") / "tiny-prose")
