"""Shared CLI plumbing: console, JSON output, one-line errors, progress bars."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# emoji codes off: a path such as `a:train:b.py` prints as written
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])

OPTIMIZER_HELP = ("adamw | muon (Muon on the Linear layers' weights, AdamW on the rest; "
                  "the same --lr and weight decay as AdamW).")


class CliError(Exception):
    """An expected failure: shown as one line, exit code 2."""


def fail(message: str) -> None:
    raise CliError(message)


def handle_errors(fn: F) -> F:
    """Turn exceptions into one clear line; ``CIR_TRACEBACK=1`` shows the full traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Terminated:
            raise typer.Exit(128 + signal.SIGTERM) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("CIR_TRACEBACK"):
                raise
            name = "error" if isinstance(exc, CliError) else type(exc).__name__
            err_console.print(f"[bold red]{name}:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` model config overrides; values parsed as JSON when they can be
    (numbers, booleans), kept as strings otherwise."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def print_json(obj: Any) -> None:
    """Machine output on stdout, nothing else: strict JSON (NaN and infinities as null)."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` as plain JSON values, non-finite floats as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return _finite(_json_default(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)


def progress(disable: bool = False) -> Progress:
    """A rich progress bar on stderr (silent with ``--json``; off a terminal, only its last
    state is printed, when it stops)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=disable,
        transient=False,
    )


def print_train_result(title: str, result: Any, as_json: bool) -> None:
    """A training run's outcome (``cir.train.TrainResult``): JSON, or a metrics table."""
    if as_json:
        print_json({"out_dir": str(result.out_dir), "step": result.step,
                    "resumed_from": result.resumed_from, "stopped_early": result.stopped_early,
                    "last": result.last, "last_eval": result.last_eval, "wall_s": result.wall_s})
        return
    from rich.table import Table

    table = Table(title=f"{title} -> {result.out_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in {**result.last, **result.last_eval}.items():
        table.add_row(key, f"{value:.4g}")
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    table.add_row("steps", f"{result.step}{resumed}")
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    console.print(table)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs."""


@contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` meanwhile, so work cleans up as on Ctrl-C (later
    SIGTERMs are ignored during the clean-up); ``handle_errors`` exits with code 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextmanager
def resumable(out: Path | None, what: str = "") -> Iterator[None]:
    """Ctrl-C or SIGTERM during a training run into ``out`` (or a mount, ``out=None``): say
    where it stands and how to go on (exit code 130, 143 for SIGTERM), instead of stopping
    silently."""
    try:
        with term_as_interrupt():
            yield
    except KeyboardInterrupt as exc:
        if out is None:
            where = what
        else:
            from cir.checkpoint import saved_step

            try:
                step = saved_step(out)
            except Exception:  # noqa: BLE001 - no checkpoint yet, or none readable
                step = 0
            where = f"from step {step:,}" if step else "from the start (no checkpoint yet)"
        err_console.print(f"interrupted: re-run the same command to resume {escape(where)}",
                          highlight=False)
        code = 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
        raise typer.Exit(code) from None
