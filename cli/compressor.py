"""`route-cli` commands of the compressor group: `compressor train | eval`, `bench compressor`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from cir.cli.common import (
    OPTIMIZER_HELP,
    console,
    fail,
    handle_errors,
    parse_overrides,
    print_json,
    print_train_result,
    progress,
    resumable,
)
from rich.table import Table

compressor_app = typer.Typer(
    help="The Transformer autoencoder (512 tokens -> 8 latents) that scores domains.",
    no_args_is_help=True,
)


def _train_info(rec: dict[str, Any]) -> str:
    return (f"loss {rec['loss']:.3f}  TRA {100 * rec.get('tra', 0.0):.1f}%  "
            f"{rec.get('tokens_per_s', 0.0):,.0f} tok/s")


@compressor_app.command("train")
@handle_errors
def train_cmd(
    data: list[str] = typer.Option(..., "--data", help="Dataset name or directory (route-cli "
                                   "data build); repeat it to train on several together."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory (re-run to resume)."),
    preset: str = typer.Option("small", help="debug | small | base | paper"),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: the preset's)."),
    batch_size: int | None = typer.Option(None, help="Chunks per step (default: the preset's)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: the preset's)."),
    schedule: str | None = typer.Option(None, help="cosine | wsd (constant, then a linear "
                                        "decay over the last 20% of the steps)."),
    optimizer: str | None = typer.Option(None, help=OPTIMIZER_HELP + " Default: the preset's."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order."),
    max_minutes: float = typer.Option(0.0, min=0.0, help="Stop (with a checkpoint) after this long; 0 = no limit."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    set_: list[str] = typer.Option([], "--set", help="Model config override key=value."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Continue from a checkpoint's weights (directory or "
        ".safetensors file) with a fresh optimizer, the learning rate re-warmed over the "
        "warmup steps; ignored when --out already holds a checkpoint."),
    decay_steps: int = typer.Option(
        0, help="Finish a wsd run: decay linearly over this many steps from where --out (or "
        "--init-from) stands; re-running the same command resumes the decay. Replaces --steps."),
    constant_steps: int = typer.Option(0, help="With --decay-steps: this many steps at the "
                                       "constant rate before the decay."),
    refit_codes: bool = typer.Option(
        True, "--refit-codes/--no-refit-codes", help="With codes (n_codes > 0): once training "
        "is done, refit each code's output shift to the training chunks its encoder picks "
        "(a few seconds; routes far better)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a compressor on a chunk dataset; re-running the same command resumes.

    Example: route-cli compressor train --data python-code --out runs/cmp --preset small

    `small` is a 3-bit discrete bottleneck (8 codes, refitted after training), trained for
    the reference's 4 minutes of 2 CPU cores. Its batch split evenly between the codes
    instead: separates code from Python docs more, routes less well
    (docs/results/cpu-compressor.md):
    route-cli compressor train --data python-code --out runs/bal --preset small
    --set code_balance=true

    The same network with continuous latents, the paper's autoencoder:
    route-cli compressor train --data python-code --out runs/cont --preset small
    --set n_codes=0 --steps 1000 --lr 3e-3

    Several corpora built with one tokenizer, sampled in proportion to their chunks:
    route-cli compressor train --data python-code --data my-code --out runs/cmp2

    Continue another machine's run from its weights alone (scripts/weight_parts.py join):
    route-cli compressor train --data python-code --out runs/cmp2 --preset paper
    --init-from runs/cmp-joined

    A wsd run at a constant rate for as long as it takes, then its decay, each command
    re-run until it is done:
    route-cli compressor train --data python-code --out runs/cmp --preset paper --schedule
    wsd --steps 1000000 --max-minutes 9; then the same without --steps, with
    --decay-steps 8000
    """
    from cir.compressor.train import default_train_config, open_split, train_compressor

    from cir.train import plan_decay

    open_split(data, "train")  # corpora that cannot be joined fail here, before the progress bar
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "schedule": schedule,
             "optimizer": optimizer}
    if decay_steps or constant_steps:
        if steps is not None or schedule not in (None, "wsd"):
            fail("--decay-steps finishes a wsd run: it replaces --steps and needs --schedule wsd")
        if decay_steps <= 0 or constant_steps < 0:
            fail("--decay-steps must be > 0 (and --constant-steps >= 0)")
        given["steps"], given["decay_frac"] = plan_decay(out, decay_steps, constant_steps,
                                                         init_from)
        given["schedule"] = "wsd"
    cfg = default_train_config(preset, seed=seed, compile=compile_, device=device,
                               max_wall_s=60.0 * max_minutes,
                               **{k: v for k, v in given.items() if v is not None})
    with resumable(out), progress(disable=as_json) as bar:
        task = bar.add_task(f"train compressor ({preset})", total=cfg.steps, info="")

        def on_log(rec: dict[str, Any]) -> None:
            if rec.get("event") == "train":
                bar.update(task, completed=rec["step"], info=_train_info(rec))

        result = train_compressor(data, out, preset=preset, train_cfg=cfg,
                                  overrides=parse_overrides(set_), on_log=on_log,
                                  init_from=init_from, refit_codes=refit_codes)
    print_train_result(f"compressor ({preset})", result, as_json)


def _open_eval_data(name: str, split: str, model: Any) -> Any:
    from cir.compressor.train import open_split

    if name == "random":  # one draw per split; "all" (of a real corpus) is its test draw
        from cir.data.shards import open_dataset

        return open_dataset("random", "test" if split == "all" else split,
                            vocab_size=model.config.vocab_size, seq_len=model.config.seq_len)
    return open_split(name, split)


@compressor_app.command("eval")
@handle_errors
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="Compressor checkpoint directory."),
    data: list[str] = typer.Option(..., "--data", help="Dataset name or directory; repeat. "
                                   "The first is in-domain; `random` is uniform tokens."),
    split: str = typer.Option("test", help="Split of every dataset: train | val | test."),
    ood_split: str | None = typer.Option(
        None, help="Split of the datasets after the first: train | val | test | all (every "
        "chunk: fair for a corpus the compressor never trained on; `random` keeps its test "
        "draw). Default: --split."),
    max_chunks: int | None = typer.Option(None, help="Chunks per dataset (evenly spread)."),
    batch_size: int | None = typer.Option(None, help="Chunks per scoring pass."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA, as trained "
                                  "there; fp32 on CPU) | fp32 | bf16"),
    codes: str = typer.Option("best", help="With codes (n_codes > 0): score each chunk under "
                              "the code that reconstructs it best | the code its encoder "
                              "names (encoder)."),
    baseline: bool = typer.Option(True, help="Also the AUROC of a unigram model of the "
                                  "first dataset's train split (a bag-of-tokens baseline)."),
    topics: list[int] = typer.Option([], "--topics", help="Also the AUROC of a topic model "
                                     "(LDA) with this many topics of the first dataset's train "
                                     "split: a bag-of-tokens compressor that adapts to each "
                                     "chunk (1 topic = the unigram); repeat. About a minute "
                                     "per 8 topics on 5M tokens and 2 cores."),
    clusters: list[int] = typer.Option([], "--clusters", help="Also the AUROC of a mixture "
                                       "of this many unigrams of the first dataset's train "
                                       "split, each chunk scored by its best one: a "
                                       "bag-of-tokens compressor with a discrete bottleneck "
                                       "(1 = the unigram); repeat. Seconds on 5M tokens."),
    worst: int = typer.Option(0, "--worst", min=0, help="Also list each dataset's N worst "
                              "documents (see --worst-by) and their share of the errors "
                              "(datasets with a document index)."),
    worst_by: str = typer.Option("tra", "--worst-by", help="tra: lowest TRA first (what it "
                                 "cannot read) | errors: most wrong tokens first (where the "
                                 "errors are)."),
    unseen_below: float | None = typer.Option(
        None, "--unseen-below", min=0.0, max=1.0, help="Also the first dataset's row over "
        "only its documents with less than this share of their 16-token n-grams in its train "
        "split (see `data overlap`): the figure on code not seen in training already."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Reconstruction accuracy (TRA) per dataset and AUROC vs the first (in-domain) one.

    Next to the compressor's AUROC: the same AUROC scored by a unigram model of the
    in-domain training split (what the compressor has to beat to be worth routing with).

    Example: route-cli compressor eval runs/cmp --data python-code --data python-docs
    --data random --max-chunks 200

    Every chunk of the corpora the compressor never trained on: route-cli compressor eval
    runs/cmp --data python-code --data python-prose --data random --ood-split all

    Which held-out documents it fails on: route-cli compressor eval runs/cmp --data
    python-code --worst 20

    Only held-out documents less than half seen in training: route-cli compressor eval
    runs/cmp --data python-code --data python-docs --unseen-below 0.5

    Against bag-of-tokens compressors of 8 and 32 topics (has it learned token order?):
    route-cli compressor eval runs/cmp --data python-code --data python-docs --topics 8
    --topics 32

    Against a mixture of 8 unigrams, each chunk scored by its best one (a coded compressor
    without a network): route-cli compressor eval runs/cmp --data python-code --data
    python-docs --clusters 8
    """
    from cir.compressor.evaluate import (
        WORST_BY,
        auroc_table,
        cluster_auroc_table,
        document_errors,
        evaluate,
        restrict_row,
        rows_to_markdown,
        topic_auroc_table,
        unigram_auroc_table,
    )

    from cir.checkpoint import check_tokenizer, load_checkpoint
    from cir.train import PRECISIONS

    if precision not in PRECISIONS:
        fail(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if codes not in ("best", "encoder"):
        fail(f"--codes must be best or encoder, got {codes!r}")
    if worst_by not in WORST_BY:
        fail(f"--worst-by must be {' or '.join(WORST_BY)}, got {worst_by!r}")
    for flag, counts in (("--topics", topics), ("--clusters", clusters)):
        if any(k < 1 for k in counts):
            fail(f"{flag} must be at least 1, got {min(counts)}")
        if counts and data[0] == "random":
            fail(f"{flag} fits a model on the first dataset's train split; `random` has none")
    if split == "all":
        fail("--split all would score the in-domain training chunks; use --ood-split all")
    model = load_checkpoint(ckpt, device=device, expect="compressor")
    other = split if ood_split is None else ood_split
    datasets = {name: _open_eval_data(name, other if i else split, model)
                for i, name in enumerate(data)}
    for d in datasets.values():
        check_tokenizer(ckpt, d)
    if worst:  # a broken document index fails here, before any scoring
        for d in datasets.values():
            if hasattr(d, "documents"):
                d.documents()
    first = datasets[data[0]]
    if unseen_below is not None and (not hasattr(first, "documents") or first.documents() is None):
        fail(f"--unseen-below needs a document index on {data[0]} (random tokens and packed "
             "datasets have none; rebuild one built before indexes)")
    total = sum(min(len(d), max_chunks or len(d)) for d in datasets.values())
    with progress(disable=as_json or markdown) as bar:
        task = bar.add_task("score", total=total, info="")
        rows = evaluate(model, datasets, batch_size=batch_size, max_chunks=max_chunks,
                        precision=precision, codes=codes, on_batch=lambda name, n: bar.update(task, advance=n, info=name))
    aurocs = auroc_table(rows) if len(rows) > 1 else {}
    train_split = None
    if data[0] != "random" and ((baseline and len(rows) > 1) or unseen_below is not None
                                or topics or clusters):
        try:
            train_split = _open_eval_data(data[0], "train", model)
        except (FileNotFoundError, ValueError):
            train_split = None  # no training split to fit the baseline on: leave it out
    base: dict[str, float] | None = None
    if baseline and len(rows) > 1 and train_split is not None and len(train_split) > 0:
        base = unigram_auroc_table(rows, datasets, train_split, model.config.vocab_size,
                                   max_chunks)
    topic_base: dict[int, dict[str, float]] = {}
    cluster_base: dict[int, dict[str, float]] = {}
    fits = [(k, "topics", topic_auroc_table, topic_base) for k in dict.fromkeys(topics)]
    fits += [(k, "clusters", cluster_auroc_table, cluster_base) for k in dict.fromkeys(clusters)]
    if fits and len(rows) > 1:
        if train_split is None or len(train_split) == 0:
            fail(f"--{fits[0][1]} needs {data[0]}'s train split")
        with progress(disable=as_json or markdown) as bar:
            task = bar.add_task("bag-of-tokens models", total=len(fits), info="")
            for k, what, table, into in fits:
                bar.update(task, info=f"{k} {what}")
                into[k] = table(rows, datasets, train_split, model.config.vocab_size, k,
                                max_chunks)
                bar.advance(task)
    bag_base = {**{f"{k} topics": a for k, a in topic_base.items()},
                **{f"{k} clusters": a for k, a in cluster_base.items()}}
    by_doc = ({r.name: document_errors(r, datasets[r.name], worst, worst_by) for r in rows}
              if worst else {})
    shown, unseen = rows, None
    if unseen_below is not None:
        if train_split is None:
            fail(f"--unseen-below needs {data[0]}'s train split")
        from cir.data.overlap import document_shares

        with progress(disable=as_json or markdown) as bar:
            task = bar.add_task("n-grams seen in train", total=len(train_split) + len(first), info="")
            shares = document_shares(first, train_split, n=16, on_batch=lambda k: bar.advance(task, k))
        keep = shares < unseen_below
        row = restrict_row(rows[0], first, keep, f"{data[0]}, < {100 * unseen_below:g}% seen")
        shown = [rows[0], row, *rows[1:]]
        unseen = {"threshold": unseen_below, "n": 16, "row": row.name,
                  "documents": int(keep.sum()), "of": len(keep)}
    if as_json:
        out = {"checkpoint": str(ckpt), "split": split, "ood_split": other,
               "rows": [r.to_dict() for r in shown], "auroc_vs_first": aurocs,
               "unigram_auroc_vs_first": base}
        if topics:
            out["topic_auroc_vs_first"] = {str(k): a for k, a in topic_base.items()}
        if clusters:
            out["cluster_auroc_vs_first"] = {str(k): a for k, a in cluster_base.items()}
        if worst:
            out["documents"] = by_doc
        if unseen is not None:
            out["unseen_below"] = unseen
        print_json(out)
        return
    if markdown:
        print(rows_to_markdown(shown, aurocs, base, bag_base))
    else:
        _print_rows(shown, aurocs, base, bag_base)
    if unseen is not None:
        _print_note(f"{unseen['row']}: the {unseen['documents']:,} of {unseen['of']:,} documents "
                    f"with less than {100 * unseen_below:g}% of their 16-grams in {data[0]}'s train "
                    "split", markdown)
    for name, errors in by_doc.items():
        _print_worst(name, errors, markdown)


def _print_rows(rows: list[Any], aurocs: dict[str, float], base: dict[str, float] | None,
                bags: dict[str, dict[str, float]] | None = None) -> None:
    table = Table(title=f"reconstruction (in-domain: {rows[0].name})")
    cols = ["dataset", "chunks", "tokens", "TRA", "TRA/\nchunk", "CE", "AUROC\nvs ID"]
    cols += ["AUROC\nunigram"] if base is not None else []
    cols += [f"AUROC\n{label}" for label in (bags or {})]
    for col in cols:
        if col == "dataset":  # names (often paths) wrap rather than being cut
            table.add_column(col, overflow="fold", min_width=12)
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        cells = [r.name, str(r.chunks), f"{r.tokens:,}", f"{100 * r.tra:.2f}%",
                 f"{100 * r.tra_chunk_mean:.2f}%", f"{r.loss:.3f}",
                 f"{aurocs[r.name]:.4f}" if r.name in aurocs else "-"]
        for b in ([base] if base is not None else []) + list((bags or {}).values()):
            cells.append(f"{b[r.name]:.4f}" if r.name in b else "-")
        table.add_row(*cells)
    console.print(table)


def _print_note(note: str, markdown: bool) -> None:
    """A line under the table: plain after Markdown, dim in the terminal."""
    if markdown:
        print(f"\n{note}")
    else:
        console.print(f"[dim]{note}[/]")


def _print_worst(name: str, errors: dict[str, Any] | None, markdown: bool) -> None:
    if errors is None:
        _print_note(f"{name}: no document index (random tokens, a packed dataset, or one built "
                    "before indexes)", markdown)
        return
    rank = "lowest-TRA" if errors["by"] == "tra" else "most-wrong"
    title = (f"{name}: the {len(errors['worst'])} {rank} of {errors['documents']:,} documents "
             f"hold {100 * errors['worst_error_share']:.1f}% of the wrong tokens in "
             f"{100 * errors['worst_token_share']:.1f}% of the tokens (document-mean TRA "
             f"{100 * errors['tra_document_mean']:.2f}%)")
    if markdown:
        print(f"\n{title}\n\n| document | chunks | tokens | TRA | CE |\n|---|---:|---:|---:|---:|")
        for d in errors["worst"]:
            print(f"| {d['id']} | {d['chunks']} | {d['tokens']} | {100 * d['tra']:.2f}% | {d['loss']:.3f} |")
        return
    table = Table(title=title)
    table.add_column("document", overflow="fold")
    for col in ("chunks", "tokens", "TRA", "CE"):
        table.add_column(col, justify="right", no_wrap=True)
    for d in errors["worst"]:
        table.add_row(d["id"], str(d["chunks"]), f"{d['tokens']:,}", f"{100 * d['tra']:.2f}%",
                      f"{d['loss']:.3f}")
    console.print(table)


def _listed(overrides: dict[str, Any]) -> str:
    """``", key=value, ..."``: the config overrides a benchmark ran with, for its title."""
    return "".join(f", {k}={v}" for k, v in overrides.items())


@handle_errors
def bench_cmd(
    preset: list[str] = typer.Option(["small"], "--preset", help="Preset(s) to measure."),
    batch_size: int = typer.Option(8, help="Chunks per scoring pass."),
    repeats: int = typer.Option(3, help="Timed repeats (the median is reported)."),
    warmup: int = typer.Option(1, help="Untimed passes first."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    set_: list[str] = typer.Option([], "--set", help="Model config override key=value "
                                   "(e.g. n_codes=8), as in `compressor train`."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Scoring throughput (tokens/s) of compressor presets on this machine.

    Weights are random: throughput does not depend on their values.
    Example: route-cli bench compressor --preset small --preset paper --batch-size 8

    `small` with continuous latents: route-cli bench compressor --preset small
    --batch-size 64 --set n_codes=0
    """
    from cir.compressor.bench import bench_scoring

    overrides = parse_overrides(set_)
    results = []
    with progress(disable=as_json) as bar:
        task = bar.add_task("bench", total=len(preset), info="")
        for name in preset:
            bar.update(task, info=name)
            results.append(bench_scoring(name, batch_size=batch_size, repeats=repeats,
                                         warmup=warmup, device=device, **overrides))
            bar.advance(task)
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    table = Table(title=f"compressor scoring throughput (random weights{_listed(overrides)})")
    for col in ("preset", "params", "device", "threads", "batch", "median s/batch", "tokens/s"):
        table.add_column(col, justify="left" if col in ("preset", "device") else "right")
    for r in results:
        table.add_row(r.preset, f"{r.params / 1e6:.1f}M", r.device, str(r.threads),
                      f"{r.batch_size}x{r.seq_len}", f"{r.median_s:.3f}", f"{r.tokens_per_s:,.0f}")
    console.print(table)


@handle_errors
def bench_train_cmd(
    preset: str = typer.Option("small", "--preset", help="Preset to measure."),
    batch_size: int = typer.Option(0, help="Chunks per step (0: the preset's default)."),
    repeats: int = typer.Option(5, help="Timed steps (the median is reported)."),
    warmup: int = typer.Option(2, help="Untimed steps first (compilation happens there)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    compile_mode: list[str] = typer.Option(
        ["off"], "--compile", help="off | default | reduce-overhead | max-autotune | "
        "max-autotune-no-cudagraphs; repeat to compare."),
    optimizer: list[str] = typer.Option(["adamw"], "--optimizer",
                                        help="adamw | muon; repeat to compare."),
    loss_fraction: float = typer.Option(0.0, help="Share of positions the loss is taken on "
                                        "(0: the preset's default)."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA) | fp32 | bf16"),
    peak_tflops: float = typer.Option(989.0, help="The chip's dense bf16 peak, for MFU."),
    set_: list[str] = typer.Option([], "--set", help="Model config override key=value "
                                   "(e.g. n_codes=8), as in `compressor train`."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Training throughput (tokens/s, MFU on CUDA) of a compressor preset on this machine.

    One step is what `compressor train` runs: autocast, the preset's loss, backward,
    clipping, the optimizer step; on random weights and full random chunks.
    Example: route-cli bench compressor-train --preset paper --device cuda
    --compile default --compile max-autotune-no-cudagraphs --optimizer adamw --optimizer muon

    The step of `small` (8 codes) against the same with continuous latents: route-cli
    bench compressor-train --repeats 20; then the same with --set n_codes=0
    """
    from cir.compressor.bench import bench_training

    overrides = parse_overrides(set_)

    runs = [(c, o) for c in compile_mode for o in optimizer]
    results = []
    with progress(disable=as_json) as bar:
        task = bar.add_task("bench", total=len(runs), info="")
        for comp, opt in runs:
            bar.update(task, info=f"{preset} {comp} {opt}")
            results.append(bench_training(
                preset, batch_size=batch_size or None, repeats=repeats, warmup=warmup,
                device=device, compile=comp, optimizer=opt,
                loss_fraction=loss_fraction or None, precision=precision,
                peak_tflops=peak_tflops, **overrides))
            bar.advance(task)
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    table = Table(title=f"compressor training throughput ({preset}{_listed(overrides)}, "
                        "random weights)")
    cols = ("compile", "optimizer", "device", "batch", "loss on", "median s/step", "tokens/s",
            "MFU", "peak GiB")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:3] else "right")
    for r in results:
        table.add_row(r.compile, r.optimizer, r.device, f"{r.batch_size}x{r.seq_len}",
                      f"{r.loss_fraction:.0%}", f"{r.median_s:.4f}", f"{r.tokens_per_s:,.0f}",
                      "-" if r.mfu is None else f"{r.mfu:.1%}",
                      "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}")
    console.print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the top-level app and the `bench` group."""
    app.add_typer(compressor_app, name="compressor")
    bench.command("compressor")(bench_cmd)
    bench.command("compressor-train")(bench_train_cmd)
