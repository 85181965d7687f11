"""``hf:<dataset>[:<config>][:<split>]`` sources through ``datasets.load_dataset``.

Rows are streamed (``streaming=True``), so a token budget stops the download early.
Options after ``?``: ``data_files=<path or glob>`` (for the local ``text`` / ``json`` /
``csv`` / ``parquet`` builders; several with ``,``), ``column=<name>`` (default: ``text``, or
the first string column), ``streaming=0``. Ids are ``hf:<dataset>/<split>/<row id>`` with
the row's ``id`` field when it has one (not null), else its index; an id seen before gets
``#<index>`` appended, since the split is a hash of the id and a constant ``id`` column
would otherwise put every row in one split. A row whose column holds no text is skipped as
``empty`` (blank or null) or ``not-text`` (a number, a list, ...).

Offline, a Hub dataset fails at once with one line: the Hub's host is looked up first,
and the libraries' retry warnings are silenced while loading and while streaming rows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse
from urllib.request import getproxies

from cir.data.sources import Document, ReadOptions, UnknownSourceError, _reject


@dataclass(frozen=True)
class HFSpec:
    dataset: str
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    column: str | None = None
    streaming: bool = True
    extra: dict[str, str] = field(default_factory=dict)


def parse_hf_spec(spec: str) -> HFSpec:
    """Parse ``hf:<dataset>[:<config>][:<split>][?key=value&...]``."""
    if not spec.startswith("hf:"):
        raise UnknownSourceError(f"not an hf: spec: {spec}")
    body, _, query = spec[3:].partition("?")
    parts = body.split(":")
    if not parts[0] or len(parts) > 3:
        raise UnknownSourceError(f"expected hf:<dataset>[:<config>][:<split>], got {spec}")
    opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    files = opts.pop("data_files", None)
    return HFSpec(
        dataset=parts[0],
        config=(parts[1] or None) if len(parts) > 1 else None,
        split=(parts[2] or "train") if len(parts) > 2 else "train",
        data_files=files.split(",") if files else None,
        column=opts.pop("column", None),
        streaming=opts.pop("streaming", "1") not in {"0", "false", "no"},
        extra=opts,
    )


def _text_column(row: dict[str, Any], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in row:
            raise UnknownSourceError(f"column '{wanted}' not in the dataset; columns: {', '.join(row)}")
        return wanted
    if isinstance(row.get("text"), str):
        return "text"
    for key, value in row.items():
        if isinstance(value, str):
            return key
    raise UnknownSourceError(f"no string column in the dataset; columns: {', '.join(row)}")


def _unique_id(row: dict[str, Any], index: int, seen: set[str]) -> str:
    """The row's id, made unique with its index when an earlier row had it (``seen`` is
    updated): one document, one id, one split."""
    row_id = row.get("id")
    key = str(index if row_id is None else row_id)
    while key in seen:  # a loop only for ids that themselves look like "x#index"
        key = f"{key}#{index}"
    seen.add(key)
    return key


def _check_hub_reachable(spec: HFSpec) -> None:
    """ConnectionError naming the dataset when the Hub's host does not resolve, at once
    instead of after ~25 s of retries. Not for local builders (``data_files``) or folders,
    in offline mode (the libraries then fail fast themselves), or behind a proxy."""
    from datasets import config

    if spec.data_files or Path(spec.dataset).exists() or config.HF_HUB_OFFLINE or getproxies():
        return
    host = urlparse(config.HF_ENDPOINT).hostname or config.HF_ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise ConnectionError(
            f"Couldn't reach '{spec.dataset}' on the Hub: {host} does not resolve "
            f"({exc.strerror or exc}); offline? HF_HUB_OFFLINE=1 uses the local cache"
        ) from None


@contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Errors only from huggingface_hub and datasets meanwhile: their retry warnings
    ("Retrying in 8s [Retry 4/5]") would print before the one-line error."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _load(spec: HFSpec) -> Any:
    import datasets

    _check_hub_reachable(spec)
    kwargs: dict[str, Any] = {"split": spec.split, "streaming": spec.streaming}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    return datasets.load_dataset(spec.dataset, spec.config, **kwargs)


def hf_documents(spec_text: str, opts: ReadOptions) -> Iterator[Document]:
    spec = parse_hf_spec(spec_text)
    column = None
    seen: set[str] = set()
    prefix = f"hf:{spec.dataset}{'/' + spec.config if spec.config else ''}/{spec.split}"
    # quiet for the whole read, not only `load_dataset`: a streamed dataset opens and reads
    # its files as rows are taken (the levels come back when the read ends or is dropped)
    with _quiet_hub_logs():
        for index, row in enumerate(_load(spec)):
            column = column or _text_column(row, spec.column)
            where = f"{prefix}/{_unique_id(row, index, seen)}"
            text = row.get(column)
            if text is not None and not isinstance(text, str):
                _reject(opts, "not-text", where, f"column '{column}' holds {type(text).__name__}, not text")
                continue
            if text is None or not text.strip():
                _reject(opts, "empty", where)
                continue
            yield Document(where, text, f"hf:{spec.dataset}")
