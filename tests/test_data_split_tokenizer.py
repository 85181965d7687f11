"""Stable train/val/test split and the byte-level BPE tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from cir.data.shards import ids_dtype
from cir.data.split import split_of, stable_unit
from cir.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

IDS = [f"file:pkg{i % 7}/mod_{i}.py" for i in range(4000)]


def test_split_is_a_pure_function_of_the_id():
    first = {i: split_of(i) for i in IDS}
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    assert {i: split_of(i) for i in shuffled} == first
    counts = {s: sum(v == s for v in first.values()) for s in ("train", "val", "test")}
    # 5% / 5% with binomial noise on 4000 draws (sd ~ 14)
    assert abs(counts["val"] - 200) < 80 and abs(counts["test"] - 200) < 80


def test_split_does_not_depend_on_pythonhashseed():
    code = "import json,sys; from cir.data.split import split_of; print(json.dumps([split_of(i) for i in json.loads(sys.argv[1])]))"
    ids = IDS[:300]
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    env = {**os.environ, "PYTHONHASHSEED": seed}  # differs from this process's seed
    run = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], env=env, capture_output=True, text=True, check=True)
    assert json.loads(run.stdout) == [split_of(i) for i in ids]


def test_split_matches_blake2b_reference_and_fractions():
    doc_id = "python-code:stdlib/os.py"
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    assert stable_unit(doc_id) == int.from_bytes(digest, "big") / 2**64
    u = stable_unit(doc_id)
    assert split_of(doc_id, val_frac=0.0, test_frac=0.0) == "train"
    assert split_of(doc_id, val_frac=u + 1e-9, test_frac=0.0) == "val"
    with pytest.raises(ValueError):
        split_of(doc_id, val_frac=0.6, test_frac=0.5)


ROUND_TRIP = [
    "def f(x):\n\treturn x  *  2\n\n\n",
    "    indented\r\n\ttabs\t\tand  spaces   \n",
    "Café naïve résumé — «quotes»",
    "中文字符和日本語のテキスト",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻",
    "",
    " leading space and trailing  ",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok, text):
    assert decode(tok, encode(tok, text)) == text


def test_round_trip_on_corpus_files(tok, tiny_corpus):
    for path in sorted(tiny_corpus.rglob("*"))[:20]:
        if path.is_file():
            text = path.read_text()
            ids = encode(tok, text)
            assert decode(tok, ids) == text
            assert PAD_ID not in ids and EOS_ID not in ids


def test_special_ids_and_vocab(tok):
    assert tok.token_to_id("<pad>") == PAD_ID and tok.token_to_id("<eos>") == EOS_ID
    assert tok.get_vocab_size() == 512
    assert decode(tok, [PAD_ID, *encode(tok, "ab"), EOS_ID]) == "ab"
    assert ids_dtype(DEFAULT_VOCAB_SIZE) == np.uint16 and ids_dtype(2**16) == np.uint16
    assert ids_dtype(2**16 + 1) == np.uint32


def test_training_is_deterministic(tiny_corpus, tmp_path):
    texts = [p.read_text() for p in sorted(tiny_corpus.rglob("*.py"))]
    a = save_tokenizer(train_tokenizer(texts, vocab_size=400), tmp_path / "a.json")
    b = save_tokenizer(train_tokenizer(iter(texts), vocab_size=400), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    assert tokenizer_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest() == tokenizer_hash(tmp_path / "b.json")


def test_save_load_same_encoding(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path)
    assert path.name == "tokenizer.json"
    again = load_tokenizer(tmp_path)
    for text in ROUND_TRIP:
        assert encode(again, text) == encode(tok, text)


def test_bad_vocab_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
