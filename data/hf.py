"""``hf:<dataset>[:<config>][:<split>]`` sources through ``datasets.load_dataset``.

Rows are streamed (``streaming=True``), so a token budget stops the download early.
Options after ``?``: ``data_files=<path or glob>`` (for the local ``text`` / ``json`` /
``csv`` / ``parquet`` builders; several with ``,``), ``column=<name>`` (default: ``text``, or
the first string column), ``streaming=0``. Ids are ``hf:<dataset>/<split>/<row id>`` with
the row's ``id`` field when it has one, else its index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

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


def _load(spec: HFSpec) -> Any:
    import datasets

    kwargs: dict[str, Any] = {"split": spec.split, "streaming": spec.streaming}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    return datasets.load_dataset(spec.dataset, spec.config, **kwargs)


def hf_documents(spec_text: str, opts: ReadOptions) -> Iterator[Document]:
    spec = parse_hf_spec(spec_text)
    rows = _load(spec)
    column = None
    prefix = f"hf:{spec.dataset}{'/' + spec.config if spec.config else ''}/{spec.split}"
    for index, row in enumerate(rows):
        column = column or _text_column(row, spec.column)
        row_id = row.get("id", index)
        where = f"{prefix}/{row_id}"
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            _reject(opts, "empty", where)
            continue
        yield Document(where, text, f"hf:{spec.dataset}")
