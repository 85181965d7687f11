"""`score`: every bad-input case, streaming equals whole-file chunking, the CLI."""

from __future__ import annotations

import io
import json
import os
import random
import string
from dataclasses import dataclass

import pytest
import torch
from _router_helpers import registry_with
from cir.cli.main import app
from cir.data import chunk_text, load_tokenizer
from cir.router import score as score_mod
from cir.router.routing import route_chunks
from cir.router.score import score_path, score_paths, sniff
from typer.testing import CliRunner

SEQ = 16


@dataclass
class _Cfg:
    seq_len: int = SEQ


@dataclass
class _Scores:
    loss: torch.Tensor
    tra: torch.Tensor


class ParityScorer:
    """Loss depends on the share of even token ids: 'even' likes even ids, 'odd' odd ones."""

    config = _Cfg()

    def __init__(self, parity: int) -> None:
        self.parity = parity

    def score(self, ids, mask, batch_size=None):
        hit = ((ids % 2 == self.parity) & mask).sum(1).float() / mask.sum(1).float()
        return _Scores(loss=1.0 - hit, tra=hit)


@dataclass
class FakeExpert:
    name: str
    compressor: ParityScorer
    threshold: float | None = 0.0
    bytes_per_token: float | None = None


EXPERTS = [FakeExpert("even", ParityScorer(0)), FakeExpert("odd", ParityScorer(1))]
TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n"


@pytest.fixture
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def _score(path, tok, **kw):
    return score_path(path, EXPERTS, tok, **kw)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"  \n\t\r\n   ", "whitespace only"), (b"abc\x00def" * 10, "binary"),
     (bytes(range(256)) * 4, "binary")],
)
def test_skipped_inputs(tmp_path, tok, content, reason):
    path = tmp_path / "f"
    path.write_bytes(content)
    rep = _score(path, tok)
    assert (rep.status, rep.reason, rep.result) == ("skipped", reason, None)
    assert rep.n_bytes == len(content)


def test_missing_directory_unreadable(tmp_path, tok):
    assert (_score(tmp_path / "nope", tok).status, _score(tmp_path / "nope", tok).reason) == (
        "error", "not found")
    assert _score(tmp_path, tok).reason == "directory"
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text(TEXT)
        locked.chmod(0)
        rep = _score(locked, tok)
        assert rep.status == "error" and rep.reason.startswith("unreadable")


@pytest.mark.parametrize(
    "content",
    ["café au lait, naïve résumé\n".encode("latin-1"),
     TEXT.encode() + b"\xff\xfe broken \x80 bytes\n" + TEXT.encode()],
)
def test_non_utf8_is_scored_with_replacement_and_flagged(tmp_path, tok, content):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    rep = _score(path, tok)
    assert rep.ok and len(rep.warnings) == 1 and "not valid UTF-8" in rep.warnings[0]
    offset = next(i for i in range(len(content)) if content[i] >= 0x80 and not _valid_at(content, i))
    assert f"offset {offset}" in rep.warnings[0]
    ids, lengths = chunk_text(content.decode("utf-8", "replace"), tok, SEQ)
    assert rep.result.n_tokens.tolist() == lengths.tolist()


def _valid_at(data: bytes, i: int) -> bool:
    try:
        data[: i + 4].decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        return exc.start > i


def test_density_warning_for_text_the_tokenizer_cannot_pack(tmp_path, tok):
    rng = random.Random(0)
    noise = "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation)
                    for _ in range(3000))
    noise_bpt = len(noise) / len(tok.encode(noise).ids)  # about one character per token
    ref = 2.5 * noise_bpt  # the experts' held-out text (a real tokenizer: 3-4 bytes/token)
    assert len(TEXT.encode()) / len(tok.encode(TEXT).ids) > 0.5 * ref  # the premise
    experts = [FakeExpert("even", ParityScorer(0), bytes_per_token=ref),
               FakeExpert("odd", ParityScorer(1), bytes_per_token=1.5 * ref)]
    (tmp_path / "noise.txt").write_text(noise)
    (tmp_path / "text.txt").write_text(TEXT * 20)
    rep = score_path(tmp_path / "noise.txt", experts, tok)
    assert rep.ok and len(rep.warnings) == 1 and "bytes/token" in rep.warnings[0]
    assert f"{noise_bpt:.2f} bytes/token here, {ref:.2f}-{1.5 * ref:.2f}" in rep.warnings[0]
    assert rep.tokenizer_ood and rep.to_dict()["tokenizer_ood"] is True
    plain = score_path(tmp_path / "text.txt", experts, tok)
    assert plain.warnings == [] and not plain.tokenizer_ood
    assert _score(tmp_path / "noise.txt", tok).warnings == []  # experts without the figure


def test_expert_bytes_per_token_from_mount_stats(tmp_path):
    from cir.router.registry import ExpertInfo

    splits = {"train": {"bytes": 900, "tokens": 300}, "val": {"bytes": 100, "tokens": 50},
              "test": {"bytes": 300, "tokens": 50}}
    info = ExpertInfo("x", tmp_path, {"corpus": {"splits": splits}}, {})
    assert info.bytes_per_token == pytest.approx(4.0)  # held-out: (100 + 300) / (50 + 50)
    del splits["val"], splits["test"]
    assert info.bytes_per_token == pytest.approx(3.0)  # else the train split
    assert ExpertInfo("x", tmp_path, {}, {}).bytes_per_token is None


def test_short_file_is_one_padded_chunk(tmp_path, tok):
    path = tmp_path / "short.py"
    path.write_text("x = 1\n")
    rep = _score(path, tok)
    n = len(tok.encode("x = 1\n").ids)
    assert rep.ok and len(rep.result) == 1 and rep.result.n_tokens.tolist() == [n] and n < SEQ


def test_stream_equals_whole_file_and_routes_per_chunk(tmp_path, tok, monkeypatch):
    text = "".join(f"line {i}: " + TEXT for i in range(40))
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(score_mod, "READ_BYTES", 97)  # many small reads
    rep = _score(path, tok)
    ids_np, lengths = chunk_text(text, tok, SEQ)
    ids = torch.from_numpy(ids_np)
    mask = torch.arange(SEQ)[None] < torch.from_numpy(lengths)[:, None]
    ref = route_chunks(EXPERTS, ids, mask)
    assert rep.result.labels() == ref.labels()
    torch.testing.assert_close(rep.result.loss, ref.loss)


def test_stdin_and_sniff(tok):
    rep = _score("-", tok, stdin=io.BytesIO(TEXT.encode()))
    assert rep.ok and rep.path == "-"
    assert _score("-", tok, stdin=io.BytesIO(b"")).reason == "empty"
    info = sniff([b"ab", b"\xc3", b"\xa9"])  # a character split across reads is valid
    assert info.bad_utf8_at is None and info.n_bytes == 4
    assert sniff([b"ab\xc3"]).bad_utf8_at == 2
    # the offset counts from the file's start, also when a character began in the last read
    for blocks in ([b"ab\xc3", b"\xa9\xff"], [b"ab\xc3\xa9\xff"], [b"a", b"b\xc3", b"\xa9", b"\xff"]):
        assert sniff(blocks).bad_utf8_at == 4, blocks
    assert sniff([b"ab\xe2\x82", b"x"]).bad_utf8_at == 2  # a character cut short


def test_one_bad_file_does_not_stop_the_others(tmp_path, tok):
    good = tmp_path / "good.py"
    good.write_text(TEXT)
    seen = []
    reps = score_paths([tmp_path / "missing", good, tmp_path], EXPERTS, tok, on_file=seen.append)
    assert [r.status for r in reps] == ["error", "ok", "skipped"] and seen == reps
    d = reps[1].to_dict(per_chunk=True)
    assert d["n_chunks"] == len(d["chunks"]) and d["decision"]["majority"] in ("even", "odd")


def test_cli_score(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    good = tmp_path / "a.py"
    good.write_text(TEXT * 5)
    runner = CliRunner()
    args = ["score", "--registry", str(reg.root)]
    res = runner.invoke(app, [*args, str(good), str(tmp_path / "missing"), "--json", "--per-chunk"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [f["status"] for f in out["files"]] == ["ok", "error"]
    assert out["experts"] == ["code", "prose"] and out["files"][0]["chunks"]
    res = runner.invoke(app, [*args, str(tmp_path / "missing"), str(tmp_path)])
    assert res.exit_code == 1 and "not found" in res.stdout and "directory" in res.stdout
    res = runner.invoke(app, [*args, "-"], input=TEXT)
    assert res.exit_code == 0 and "route:" in res.stdout
    empty = runner.invoke(app, ["score", "--registry", str(tmp_path / "none"), str(good)])
    assert empty.exit_code == 2 and "no usable expert" in empty.output


def test_cli_experts_and_unmount(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    (reg.root / "code" / "calibration.json").write_text('{"threshold": 0.5}')  # tampered
    runner = CliRunner()
    res = runner.invoke(app, ["experts", "--registry", str(reg.root), "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)["experts"]}
    assert not rows["code"]["ok"] and rows["prose"]["ok"]
    assert "corrupted: code" in runner.invoke(app, ["experts", "--registry", str(reg.root)]).stdout
    res = runner.invoke(app, ["unmount", "nope", "--registry", str(reg.root), "--yes"])
    assert res.exit_code == 2 and "mounted: code, prose" in res.output
    res = runner.invoke(app, ["unmount", "code", "--registry", str(reg.root), "--yes"])
    assert res.exit_code == 0 and reg.names() == ["prose"]
