"""The topic-model baseline of `compressor eval`: a bag-of-tokens compressor (LDA) scored
like a compressor, whose one-topic case is the unigram baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _toy import Halves
from cir.cli.main import app
from cir.compressor.evaluate import (
    EvalRow,
    TopicModel,
    chunk_bags,
    rows_to_markdown,
    topic_auroc_table,
    unigram_chunk_loss,
    unigram_logprobs,
)
from typer.testing import CliRunner


def _halves(n: int, **kw) -> Halves:
    return Halves(n, seq_len=64, vocab=128, **kw)


def test_chunk_bags_count_each_chunks_tokens_in_scoring_order():
    data = _halves(30, seed=1, empty=(3, 7))
    bags = chunk_bags(data, 128, max_chunks=20, batch=6)  # batching must not matter
    idx = [i for i in np.unique(np.linspace(0, 29, 20).round().astype(int)) if data.lengths[i]]
    want = np.stack([np.bincount(data.ids[i, : data.lengths[i]], minlength=128) for i in idx])
    np.testing.assert_array_equal(bags.toarray(), want)


def test_one_topic_is_the_add_one_unigram():
    train, data = _halves(80, seed=2), _halves(30, seed=3, empty=(4,))
    model = TopicModel.fit(train, 128, n_topics=1)
    np.testing.assert_allclose(model.topics[0], np.exp(unigram_logprobs(train, 128)), rtol=1e-9)
    np.testing.assert_allclose(model.chunk_loss(data, max_chunks=25),
                               unigram_chunk_loss(unigram_logprobs(train, 128), data, 25),
                               rtol=1e-6)


def test_topics_adapt_to_each_chunks_vocabulary():
    """Trained on both halves, a unigram spreads its mass over 96 tokens; two topics find
    the halves, and each chunk's mixture puts its mass on the 48 tokens it draws from."""
    train, data = _halves(400, seed=4), _halves(50, seed=5, half=1)
    uni = unigram_chunk_loss(unigram_logprobs(train, 128), data).mean()
    two = TopicModel.fit(train, 128, n_topics=2).chunk_loss(data).mean()
    assert uni == pytest.approx(math.log(96), abs=0.1)
    assert two == pytest.approx(math.log(48), abs=0.15)


def test_topic_auroc_table_scores_the_rows_chunks():
    train = _halves(200, seed=6, half=0)
    sets = {"id": _halves(40, seed=7, half=0), "ood": _halves(40, seed=8, half=1)}
    rows = [EvalRow(name, len(d), 0, 0, 0, 0, chunk_loss=np.zeros(len(d)))
            for name, d in sets.items()]
    table = topic_auroc_table(rows, sets, train, 128, n_topics=2)
    assert set(table) == {"ood"} and table["ood"] == 1.0  # ood tokens are unseen in training
    md = rows_to_markdown(rows, {"ood": 0.5}, None, {2: table})
    assert "| AUROC 2 topics |" in md.splitlines()[0]
    assert md.splitlines()[-1].endswith("| 0.5000 | 1.0000 |")


def _eval(*args: str):
    return CliRunner().invoke(app, ["compressor", "eval", *args], env={"COLUMNS": "200"})


def test_cli_eval_topics(tiny_dataset, tiny_prose_dataset, tmp_path):
    from cir.compressor.model import Compressor, CompressorConfig

    from cir.checkpoint import save_checkpoint

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    save_checkpoint(tmp_path / "m", Compressor(CompressorConfig.from_name(
        "debug", vocab_size=manifest["vocab_size"], seq_len=manifest["seq_len"])))
    common = [str(tmp_path / "m"), "--data", str(tiny_dataset), "--data",
              str(tiny_prose_dataset), "--data", "random", "--ood-split", "all"]
    res = _eval(*common, "--topics", "1", "--topics", "3", "--topics", "3", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    topics = ev["topic_auroc_vs_first"]
    assert set(topics) == {"1", "3"}  # a repeated count is fitted once
    for name, value in ev["unigram_auroc_vs_first"].items():  # one topic = the unigram
        assert topics["1"][name] == pytest.approx(value, abs=1e-9)
    assert topics["3"]["random"] > 0.9 and 0.0 <= topics["3"][str(tiny_prose_dataset)] <= 1.0
    md = _eval(*common, "--topics", "3", "--markdown")
    assert md.exit_code == 0, md.output
    assert md.stdout.splitlines()[0].endswith("| AUROC unigram | AUROC 3 topics |")
    shown = _eval(*common, "--topics", "3")
    assert shown.exit_code == 0 and "3 topics" in shown.stdout  # a column of the table
    plain = json.loads(_eval(*common, "--json").stdout)
    assert "topic_auroc_vs_first" not in plain
    bad = _eval(*common, "--topics", "0")
    assert bad.exit_code != 0 and "--topics must be at least 1" in bad.output
    rnd = _eval(str(tmp_path / "m"), "--data", "random", "--data", str(tiny_dataset),
                "--topics", "2")
    assert rnd.exit_code != 0 and "`random` has none" in rnd.output
