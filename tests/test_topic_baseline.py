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
    md = rows_to_markdown(rows, {"ood": 0.5}, None, {"2 topics": table})
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
    assert "topic_auroc_vs_first" not in plain and "cluster_auroc_vs_first" not in plain
    both = json.loads(_eval(*common, "--clusters", "1", "--clusters", "4", "--topics", "2",
                            "--json").stdout)
    clusters = both["cluster_auroc_vs_first"]
    assert set(clusters) == {"1", "4"} and set(both["topic_auroc_vs_first"]) == {"2"}
    for name, value in ev["unigram_auroc_vs_first"].items():  # one cluster = the unigram
        assert clusters["1"][name] == pytest.approx(value, abs=1e-9)
    assert clusters["4"]["random"] > 0.9
    md = _eval(*common, "--topics", "2", "--clusters", "4", "--markdown")
    assert md.stdout.splitlines()[0].endswith(
        "| AUROC unigram | AUROC 2 topics | AUROC 4 clusters |"), md.stdout
    bad = _eval(*common, "--clusters", "0")
    assert bad.exit_code != 0 and "--clusters must be at least 1" in bad.output
    bad = _eval(*common, "--topics", "0")
    assert bad.exit_code != 0 and "--topics must be at least 1" in bad.output
    rnd = _eval(str(tmp_path / "m"), "--data", "random", "--data", str(tiny_dataset),
                "--topics", "2")
    assert rnd.exit_code != 0 and "`random` has none" in rnd.output


def test_one_cluster_of_unigrams_is_the_add_one_unigram():
    from cir.compressor.evaluate import UnigramMixture

    train, data = _halves(80, seed=2), _halves(30, seed=3, empty=(4,))
    mix = UnigramMixture.fit(train, 128, n_clusters=1)
    np.testing.assert_allclose(mix.log_probs[0], unigram_logprobs(train, 128), rtol=1e-12)
    np.testing.assert_allclose(mix.chunk_loss(data), unigram_chunk_loss(
        unigram_logprobs(train, 128), data), rtol=1e-12)
    assert len(mix.chunk_loss(data)) == 29  # the empty chunk dropped, as by score_dataset


def test_unigram_clusters_find_the_halves_and_score_by_the_best_one():
    """Two halves of disjoint 48-token vocabularies: two clusters take one half each, so a
    chunk costs about log 48 nats under its best cluster, against log 96 for one unigram;
    a chunk's loss is its own cluster's cross-entropy, counted by hand."""
    from cir.compressor.evaluate import UnigramMixture

    train, test = _halves(200, seed=4), _halves(40, seed=5)
    for seed in (0, 1, 2):
        mix = UnigramMixture.fit(train, 128, n_clusters=2, seed=seed)
        top = np.exp(mix.log_probs).argsort(1)[:, -48:]  # each cluster's 48 likeliest tokens
        assert sorted(sorted(set(t // 48 for t in (top[k] - 2))) for k in range(2)) == [[0], [1]]
        loss = mix.chunk_loss(test)
        assert np.all(np.abs(loss - math.log(48)) < 0.2), loss
        one = UnigramMixture.fit(train, 128, n_clusters=1).chunk_loss(test)
        assert np.all(one > loss + 0.5)
        i = 7  # by hand: the best cluster's mean -log p over the chunk's tokens
        toks = test.ids[i, : test.lengths[i]]
        assert loss[i] == pytest.approx(min(-mix.log_probs[k, toks].mean() for k in range(2)))
    again = UnigramMixture.fit(train, 128, n_clusters=2, seed=1)
    np.testing.assert_array_equal(again.log_probs,
                                  UnigramMixture.fit(train, 128, 2, seed=1).log_probs)
    with pytest.raises(ValueError, match="at least one cluster"):
        UnigramMixture.fit(train, 128, n_clusters=0)
    with pytest.raises(ValueError, match="at least one training chunk"):
        UnigramMixture.fit_bags(np.zeros((0, 128)), 2)
