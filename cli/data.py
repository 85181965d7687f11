"""`route-cli` commands of the data group: `data build | info | show | overlap | sources | list`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from cir.cli.common import (
    console,
    err_console,
    fail,
    handle_errors,
    print_json,
    progress,
    term_as_interrupt,
)
from rich.markup import escape
from rich.table import Table

data_app = typer.Typer(
    help="Corpora and chunk datasets: build them from a source, inspect them.",
    no_args_is_help=True,
)


def _progress_callback(bar: Any, task: Any, max_tokens: int | None) -> Any:
    def on_progress(info: dict[str, Any]) -> None:
        if info["phase"] == "tokenizer":
            bar.update(task, description="training tokenizer",
                       info=f"{info['documents']:,} docs  {info['bytes'] / 2**20:,.1f} MiB")
            return
        bar.update(task, description="encoding", total=max_tokens, completed=info["train_tokens"],
                   info=f"{info['documents']:,} docs  {info['tokens']:,} tokens")

    return on_progress


def _check_name(name: str) -> None:
    """Dataset names follow the rules of expert names: a plain folder name under datasets."""
    from cir.router.registry import RegistryError, validate_name

    try:
        validate_name(name)
    except RegistryError:
        fail(f"invalid dataset name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
             "starting with a letter or digit (no '/', '..' or spaces)")


@data_app.command("build")
@handle_errors
def build_cmd(
    name: str = typer.Argument(..., help="Dataset name (stored under $CIR_HOME/datasets/NAME)."),
    source: str = typer.Option(..., "--source", "-s", help="python-code | python-docs | python-prose | python-docstrings | c-code | man-pages | DIR | GLOB | FILE | hf:<dataset>[:<config>][:<split>]"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop once the train split has this many tokens."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Use this tokenizer.json (default: train one on the train split)."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Vocabulary of a newly trained tokenizer."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per chunk."),
    pack: bool = typer.Option(False, "--pack", help="Concatenate documents with EOS (LM training) instead of per-document chunks."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable, binary or non-UTF-8 file instead of skipping it."),
    max_file_mb: float = typer.Option(8.0, "--max-file-mb", help="Skip files larger than this many MiB (> 0)."),
    out: Path | None = typer.Option(None, "--out", help="Dataset directory (default: $CIR_HOME/datasets/NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Tokenise a source into fixed-length chunk shards with a train/val/test split.

    Example: route-cli data build pycode --source python-code --max-tokens 5000000
    """
    from cir.data.shards import build_dataset

    from cir.paths import datasets_dir

    _check_name(name)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    if not (math.isfinite(max_file_mb) and max_file_mb > 0):  # nan passes every comparison
        fail(f"--max-file-mb must be > 0 and finite, got {max_file_mb}")
    target = out if out is not None else datasets_dir() / name
    with term_as_interrupt(), progress(disable=as_json) as bar:
        task = bar.add_task("reading", total=None, info="")
        manifest = build_dataset(
            target, source, tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq_len,
            max_tokens=max_tokens, pack=pack, strict=strict, max_file_bytes=int(max_file_mb * 2**20),
            overwrite=overwrite, on_progress=_progress_callback(bar, task, max_tokens), name=name,
        )
    if as_json:
        print_json({**manifest, "path": str(target)})
    else:
        _render_info(_summary(target))
    _print_problems(manifest)


def _summary(name_or_path: str | Path) -> dict[str, Any]:
    from cir.data.shards import dataset_summary

    return dataset_summary(name_or_path)


def _print_problems(info: dict[str, Any]) -> bool:
    """Warnings and damaged shard files on stderr, so they show under --json too; True
    when a shard is damaged."""
    for warning in info.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    for problem in info.get("damaged", []):
        err_console.print(f"[bold red]damaged:[/] {escape(problem)}; rebuild the dataset "
                          "(route-cli data build ... --overwrite)", highlight=False, soft_wrap=True)
    return bool(info.get("damaged"))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _render_info(info: dict[str, Any]) -> None:
    console.print(f"[bold]{info['name']}[/]  {info['path']}")
    console.print(
        f"source {info['source']}  seq_len {info['seq_len']}  vocab {info['vocab_size']} ({info['dtype']})  "
        f"{'packed' if info['pack'] else 'per-document'}"
        f"{'' if info['pack'] or info['document_index'] else ' (no document index: rebuild for one)'}"
        f"  tokenizer {info['tokenizer_sha256'][:12]}  "
        f"{'stopped at --max-tokens  ' if info['truncated'] else ''}built {info['created_at']}",
        highlight=False,
    )
    table = Table("split", "documents", "tokens", "chunks", "MiB", "bytes/token", "fill")
    for split, s in info["splits"].items():
        table.add_row(split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['chunks']:,}",
                      f"{s['bytes'] / 2**20:,.2f}", _fmt(s["bytes_per_token"], ".3f"), _fmt(s["fill"], ".1%"))
    console.print(table)
    console.print(f"held-out (val+test) bytes/token: {_fmt(info['heldout_bytes_per_token'], '.3f')}")
    skipped = info["skipped"]["counts"]
    if not skipped:
        console.print("skipped files: none")
        return
    skip_table = Table("skipped", "files", "e.g.")
    for reason, count in skipped.items():
        examples = info["skipped"]["examples"].get(reason, [])
        skip_table.add_row(reason, f"{count:,}", examples[0] if examples else "")
    console.print(skip_table)


@data_app.command("info")
@handle_errors
def info_cmd(
    name: str = typer.Argument(..., help="Dataset name (under $CIR_HOME/datasets) or directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Documents, tokens and chunks per split, skipped files and why, bytes per token.

    Shard files that do not match the manifest (deleted, truncated) are listed as damaged
    on stderr, after the figures, and the exit code is then 1.

    Example: route-cli data info pycode --json
    """
    info = _summary(name)
    if as_json:
        print_json(info)
    else:
        _render_info(info)
    if _print_problems(info):
        raise typer.Exit(1)


@data_app.command("sources")
@handle_errors
def sources_cmd(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """Built-in sources and whether each is present on this machine.

    Example: route-cli data sources
    """
    from cir.data.sources import describe_sources

    rows = describe_sources()
    if as_json:
        print_json(rows)
        return
    table = Table("name", "kind", "present", "description")
    for row in rows:
        table.add_row(row["name"], row["kind"], "yes" if row["present"] else "[red]no[/]", row["description"])
    console.print(table)
    console.print("Also: a directory, a file, a glob, or hf:<dataset>[:<config>][:<split>][?data_files=...&column=...]")


@data_app.command("show")
@handle_errors
def show_cmd(
    name: str = typer.Argument(..., help="Dataset name (under $CIR_HOME/datasets) or directory."),
    split: str = typer.Option("val", help="train | val | test"),
    n: int = typer.Option(3, "-n", min=1, help="How many chunks."),
    seed: int = typer.Option(0, help="Seed of the random pick."),
    as_json: bool = typer.Option(False, "--json", help="Print the chunks as JSON."),
) -> None:
    """Decode a few random chunks of a dataset back to text.

    Example: route-cli data show pycode --split val -n 2
    """
    from cir.data.shards import sample_chunks
    from rich.panel import Panel

    chunks = sample_chunks(name, split, n, seed)
    if not chunks:
        err_console.print(f"the {split} split of {name} is empty: no chunks to show", highlight=False,
                          markup=False)
    if as_json:
        print_json(chunks)
        return
    for chunk in chunks:
        title = f"{split} chunk {chunk['index']} ({chunk['length']} tokens)"
        if chunk["document"] is not None:
            title += f" of {chunk['document']}"
        console.print(Panel(chunk["text"], title=title, highlight=False, expand=False), markup=False)


@data_app.command("overlap")
@handle_errors
def overlap_cmd(
    name: str = typer.Argument(..., help="Dataset name (under $CIR_HOME/datasets) or directory."),
    split: str = typer.Option("test", help="Held-out split to check: val | test."),
    against: str = typer.Option("train", help="Split whose n-grams count as seen."),
    also: list[str] = typer.Option([], "--also", help="Another dataset (same tokenizer) whose "
                                   "--against split counts as seen too: a corpus trained on "
                                   "together with NAME. Repeatable."),
    n: int = typer.Option(16, "-n", min=1, help="Tokens per n-gram."),
    top: int = typer.Option(10, "--top", min=0, help="Most-seen documents to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """How unseen the held-out documents are: their token n-grams found in training.

    Splitting by document keeps out a document, not its copies (vendored modules, licence
    headers, generated code); this measures what is left.

    Example: route-cli data overlap pycode --split test -n 16 --top 10

    With a second corpus trained on as well: route-cli data overlap pycode --also more-code
    """
    from cir.data.overlap import split_overlap
    from cir.data.shards import ChunkDataset, join_chunks, resolve_dataset

    if split == against:
        raise typer.BadParameter(f"--split and --against are both {split!r}")
    root = resolve_dataset(name)
    held = ChunkDataset(root, split)
    ref = join_chunks([ChunkDataset(r, against) for r in [root, *(resolve_dataset(a) for a in also)]])
    seen_in = " + ".join([against, *(f"{a}:{against}" for a in also)])
    with progress(disable=as_json) as bar:
        task = bar.add_task("n-grams", total=len(held) + len(ref), info=f"{seen_in} then {split}")
        res = split_overlap(held, ref, n=n, top=top, on_batch=lambda k: bar.advance(task, k))
    if as_json:
        print_json({"dataset": str(root), "split": split, "against": against, "also": also, **res})
        return
    share = "-" if res["share"] is None else f"{100 * res['share']:.2f}%"
    console.print(f"{split}: {res['ngrams']:,} {n}-grams in {res['chunks']:,} chunks, "
                  f"{share} of them in {seen_in} ({res['reference_ngrams']:,} distinct)")
    docs = res["documents"]
    if docs is None:
        console.print("[dim]no document index (a packed dataset, or built before indexes): "
                      "no per-document figures[/]")
        return
    over = ", ".join(f"{c:,} at >= {100 * float(t):.0f}%" for t, c in docs["over"].items())
    mean = "-" if docs["mean_share"] is None else f"{100 * docs['mean_share']:.2f}%"
    console.print(f"{docs['with_ngrams']:,} of {docs['count']:,} documents have an n-gram; "
                  f"mean share seen {mean}; {over}")
    if docs["top"]:
        table = Table(title=f"most-seen {split} documents")
        table.add_column("document", overflow="fold")
        table.add_column("n-grams", justify="right")
        table.add_column(f"in {seen_in}", justify="right")
        for d in docs["top"]:
            table.add_row(d["id"], f"{d['ngrams']:,}", f"{100 * d['share']:.1f}%")
        console.print(table)


@data_app.command("list")
@handle_errors
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """Datasets built under $CIR_HOME/datasets.

    Example: route-cli data list
    """
    from cir.data.shards import list_datasets

    names = list_datasets()
    if as_json:
        print_json(names)
        return
    if not names:
        console.print("no datasets yet: route-cli data build NAME --source python-code")
    for name in names:
        console.print(name)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the top-level app and the `bench` group."""
    app.add_typer(data_app, name="data")
