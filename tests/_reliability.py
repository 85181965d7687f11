"""Helpers of the reliability tests: CLI subprocesses, SIGKILL at a delay, tree hashes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROUTE_CLI = [sys.executable, "-c", "from cir.cli.main import app; app()"]


def cli_env() -> dict[str, str]:
    """One torch thread per child: deterministic numerics and no oversubscription."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ROUTE_CLI, *args], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class KillOutcome:
    killed: bool  # False: the command had already finished when the delay ran out
    returncode: int
    seconds: float


def kill_after(args: list[str], delay: float, poll: Callable[[], None] | None = None,
               until: Callable[[], bool] | None = None) -> KillOutcome:
    """Start ``route-cli ARGS``, SIGKILL it after ``delay`` seconds, or as soon as ``until()``
    is true (``poll`` runs meanwhile)."""
    start = time.monotonic()
    proc = subprocess.Popen([*ROUTE_CLI, *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and time.monotonic() - start < delay:
        if poll is not None:
            poll()
        if until is not None and until():
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    return KillOutcome(killed, rc, time.monotonic() - start)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files hold bit-identical tensors under the same names."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# A child that scores one file with cheap parity experts and the real tokenizer, chunking
# and streaming path, then prints its own peak RSS (KiB): memory of the streaming alone.
STREAM_RSS_CHILD = textwrap.dedent("""
    import resource, sys
    from dataclasses import dataclass
    import torch
    torch.set_num_threads(1)
    from cir.data import load_tokenizer
    from cir.router.score import score_path

    @dataclass
    class _Cfg:
        seq_len: int = 512

    @dataclass
    class _Scores:
        loss: torch.Tensor
        tra: torch.Tensor

    class Parity:
        config = _Cfg()
        def __init__(self, p):
            self.p = p
        def score(self, ids, mask, batch_size=None):
            hit = ((ids % 2 == self.p) & mask).sum(1).float() / mask.sum(1).float()
            return _Scores(loss=1.0 - hit, tra=hit)

    @dataclass
    class E:
        name: str
        compressor: object
        threshold: float = 0.0

    rep = score_path(sys.argv[1], [E("even", Parity(0)), E("odd", Parity(1))],
                     load_tokenizer(sys.argv[2]))
    assert rep.ok, rep
    print(len(rep.result), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def write_text_file(path: Path, n_bytes: int, block: str) -> Path:
    """A real text file of about ``n_bytes`` bytes: ``block`` repeated."""
    data = block.encode()
    with open(path, "wb") as f:
        written = 0
        while written < n_bytes:
            f.write(data)
            written += len(data)
    return path


def peak_rss_kib(cmd: list[str]) -> tuple[int, int, str]:
    """``(exit status, peak RSS of that child in KiB, stdout)`` via ``wait4``."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss, out
