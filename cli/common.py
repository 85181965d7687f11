"""Shared CLI plumbing: console, JSON output, one-line errors, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


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
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("CIR_TRACEBACK"):
                raise
            name = "error" if isinstance(exc, CliError) else type(exc).__name__
            err_console.print(f"[bold red]{name}:[/] {exc}", highlight=False, soft_wrap=True)
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
    """Machine output on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    """A rich progress bar on stderr (silent with ``--json`` or when not a terminal)."""
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
