"""`route-cli` commands of the router group: quickstart, score, mount, unmount, experts,
perplexity, and `bench continual`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from cir.cli.common import (
    console,
    err_console,
    fail,
    handle_errors,
    parse_overrides,
    print_json,
    progress,
    resumable,
)
from rich.table import Table

REGISTRY_HELP = "Registry directory (default: $CIR_REGISTRY, else $CIR_HOME/registry)."


def _registry(path: Path | None):
    from cir.router.registry import Registry

    return Registry(path)


def _why_not_loaded(name: str, error: str) -> str:
    """``error`` without the expert's name in front (the caller names the expert)."""
    return error.removeprefix(f"{name}: ")


def _warn_not_loaded(errors: list[tuple[str, str]]) -> None:
    for name, error in errors:
        err_console.print(f"[yellow]warning:[/] expert {name} not loaded: "
                          f"{_why_not_loaded(name, error)}")


def _load_experts(reg: Any, quiet: bool) -> tuple[list[Any], Any, list[tuple[str, str]]]:
    from cir.data import load_tokenizer
    from cir.router.routing import seq_len_of

    result = reg.load()
    if not quiet:
        _warn_not_loaded(result.errors)
    if not result.experts:
        hint = "; ".join(f"{n}: {_why_not_loaded(n, e)}" for n, e in result.errors) or "none mounted"
        fail(f"no usable expert in {reg.root} ({hint}); run `route-cli quickstart` "
             "or `route-cli mount NAME --source SRC`")
    try:
        seq_len_of(result.experts)
    except ValueError as exc:  # mounted before mount refused another chunk length
        fail(f"{reg.root}: {exc}")
    return result.experts, load_tokenizer(reg.tokenizer_path), result.errors


# ----------------------------------------------------------------------------- score


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def render_report(report: Any, per_chunk: bool = False) -> None:
    """A file's table: experts x (TRA, loss, share of routed tokens, threshold) + verdict."""
    head = f"[bold]{report.path}[/]"
    if not report.ok:
        colour = "yellow" if report.status == "skipped" else "red"
        console.print(f"{head}  [{colour}]{report.status}: {report.reason}[/]")
        return
    res = report.result
    dec = res.decision()
    table = Table(title=None, show_edge=False)
    for col in ("expert", "TRA", "loss", "routed", "min TRA", "max loss"):
        table.add_column(col, justify="left" if col == "expert" else "right")
    means = res.expert_means()
    ceilings = res.loss_thresholds or [None] * len(res.names)
    for name, thr, ceil in zip(res.names, res.thresholds, ceilings, strict=True):
        mark = " *" if name == dec["loss_weighted"] else ""
        table.add_row(name + mark, _fmt(means[name]["tra"]), _fmt(means[name]["loss"]),
                      f"{dec['shares'].get(name, 0.0):.0%}", _fmt(thr), _fmt(ceil))
    verdict = dec["majority"]
    ood = "[red]unknown (out of every mounted domain)[/]" if verdict == "unknown" else "in domain"
    if report.tokenizer_ood:
        ood = "[red]unlike every domain to the tokenizer[/] (see the warning)"
    console.print(f"{head}  {len(res)} chunks, {int(res.n_tokens.sum())} tokens")
    for warning in report.warnings:
        console.print(f"  [yellow]warning:[/] {warning}")
    console.print(table)
    console.print(f"  route: [bold green]{verdict}[/]  (loss-weighted: {dec['loss_weighted']}, "
                  f"unknown: {dec['unknown_fraction']:.0%} of tokens, "
                  f"{int(res.unknown.sum())} of {len(res)} chunks)  verdict: {ood}")
    segs = res.segments()
    if len(segs) > 1:
        console.print("  segments: " + ", ".join(
            f"{s.label} (chunks {s.start}-{s.end - 1})" for s in segs))
    if per_chunk:
        _render_chunks(res)


def _render_chunks(res: Any) -> None:
    table = Table(show_edge=False)
    for col in ("chunk", "tokens", "route", *[f"loss {n}" for n in res.names], "best TRA"):
        table.add_column(col, justify="right")
    labels = res.labels()
    for i in range(len(res)):
        table.add_row(str(i), str(int(res.n_tokens[i])), labels[i],
                      *[_fmt(float(v)) for v in res.loss[i]], _fmt(float(res.best_tra[i])))
    console.print(table)


def score_cmd(
    files: list[str] = typer.Argument(..., help="Files to score; '-' reads standard input."),
    per_chunk: bool = typer.Option(False, "--per-chunk", help="Also show every chunk."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    temperature: float = typer.Option(1.0, "--temperature", help="T of the soft weights softmax(-loss/T)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Chunks per scoring pass."),
) -> None:
    """Route files to the mounted experts by reconstruction error (per file and per chunk).

    Binary, empty and whitespace-only files are skipped, missing or unreadable ones are
    errors, non-UTF-8 text is scored with a warning; the exit code is non-zero only when
    no file could be scored.

    Example: route-cli score src/app.py notes.txt --per-chunk
    """
    from cir.router.routing import check_temperature
    from cir.router.score import score_paths

    try:
        check_temperature(temperature)
    except ValueError as exc:
        fail(f"--{exc}")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    reg = _registry(registry)
    experts, tok, errors = _load_experts(reg, as_json)
    on_file = None if as_json else (lambda rep: render_report(rep, per_chunk))
    reports = score_paths(files, experts, tok, temperature, batch_size, on_file=on_file)
    if as_json:
        print_json({"registry": str(reg.root), "experts": [e.name for e in experts],
                    "corrupted": [{"name": n, "error": e} for n, e in errors],
                    "files": [r.to_dict(per_chunk) for r in reports]})
    if not any(r.ok for r in reports):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- mount


def _mount_progress(bar: Any, task: Any) -> Any:
    def on_event(rec: dict[str, Any]) -> None:
        desc = f"{rec['name']}: {rec['stage']}"
        if rec.get("event") == "train":
            bar.update(task, description=desc, total=rec.get("steps"), completed=rec["step"],
                       info=f"loss {rec['loss']:.3f}")
        elif "event" not in rec:
            bar.update(task, description=desc, total=None, completed=0, info="")

    return on_event


def mount_cmd(
    name: str = typer.Argument(..., help="Expert name: letters, digits, '.', '_', '-'."),
    source: str = typer.Option(..., "--source", "-s", help="python-code | python-docs | python-prose | python-docstrings | c-code | man-pages | DIR | GLOB | FILE | hf:<dataset>[:<config>][:<split>]"),
    preset: str = typer.Option("small", "--preset", help="Model size: debug | small."),
    max_tokens: int | None = typer.Option(2_000_000, "--max-tokens", help="Training tokens to read from the source."),
    steps_compressor: int | None = typer.Option(None, "--steps-compressor", help="Compressor training steps (default: the preset's)."),
    steps_lm: int | None = typer.Option(None, "--steps-lm", help="LM training steps (default: the preset's)."),
    compressor_set: list[str] = typer.Option([], "--compressor-set", help="Compressor config override key=value (as `compressor train --set`); repeat it. The experts of one registry may differ in it."),
    lr_compressor: float | None = typer.Option(None, "--lr-compressor", help="Compressor peak learning rate (default: the preset's)."),
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Mount a new domain expert; re-running an interrupted mount resumes it.

    Builds its corpus, trains its compressor and TLinFormer LM, calibrates its OOD
    threshold and registers it atomically; existing experts are never modified.

    Example: route-cli mount c-code --source /usr/include --max-tokens 1000000

    With the paper's continuous latents instead of the default's 8 codes (routes a little
    worse; docs/results/cpu-compressor.md, "The small preset"):
    route-cli mount c-code --source /usr/include --compressor-set n_codes=0
    --steps-compressor 1000 --lr-compressor 3e-3
    """
    from cir.router.mount import MountConfig, mount

    if lr_compressor is not None and not lr_compressor > 0:
        fail(f"--lr-compressor must be > 0, got {lr_compressor}")
    cfg = MountConfig(preset=preset, max_tokens=max_tokens, steps_compressor=steps_compressor,
                      steps_lm=steps_lm, compressor_overrides=parse_overrides(compressor_set),
                      compressor_train={} if lr_compressor is None else {"lr": lr_compressor})
    reg = _registry(registry)
    with resumable(None, f"the mount of {name!r}"), progress(disable=as_json) as bar:
        task = bar.add_task(f"{name}: start", total=None, info="")
        result = mount(reg, name, source, cfg, on_event=_mount_progress(bar, task))
    info = result.info
    if as_json:
        print_json({"name": info.name, "path": str(info.path), "meta": info.meta,
                    "calibration": info.calibration, "timings": result.timings,
                    "resumed": result.resumed})
        return
    console.print(f"mounted [bold]{info.name}[/] in {info.path} "
                  f"({sum(result.timings.values()):.0f} s, threshold TRA "
                  f"{info.calibration['threshold']:.3f})")


def unmount_cmd(
    name: str = typer.Argument(..., help="Expert to remove."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Remove a mounted expert (its directory and its kept corpus).

    Example: route-cli unmount c-code --yes
    """
    reg = _registry(registry)
    reg.require(name)  # unknown names fail here, listing the mounted ones (corrupted: fine)
    if not yes and not typer.confirm(f"remove expert {name!r} from {reg.root}?"):
        raise typer.Abort()
    reg.remove(name)
    if as_json:
        print_json({"removed": name, "registry": str(reg.root)})
    else:
        console.print(f"removed [bold]{name}[/]")


def experts_cmd(
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List mounted experts: status, size, parameters, calibrated thresholds, held-out TRA.

    Corrupted experts (hash mismatch, missing files) are flagged; --json adds each
    expert's source.

    Example: route-cli experts --json
    """
    from cir.router.mount import mounted_chunk_lens
    from cir.router.registry import RegistryError

    reg = _registry(registry)
    lens = mounted_chunk_lens(reg)
    rows = []
    for name, error in reg.check():
        try:
            info = reg.info(name)
            meta, cal = info.meta, info.calibration
        except RegistryError:
            meta, cal = {}, {}
        rows.append({"name": name, "ok": error is None, "error": error,
                     "source": meta.get("source"), "bytes": meta.get("bytes"),
                     "params": meta.get("params"), "threshold": cal.get("threshold"),
                     "loss_threshold": cal.get("loss_threshold"),
                     "tra_mean": cal.get("tra_mean"), "created_at": meta.get("created_at"),
                     "seq_len": lens.get(name)})
    if as_json:
        print_json({"registry": str(reg.root), "experts": rows})
        return
    _render_experts(reg, rows)


def _short(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _render_experts(reg: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print(f"no experts in {reg.root}: run `route-cli quickstart` or `route-cli mount`")
        return
    table = Table(title=str(reg.root))
    table.add_column("expert", no_wrap=True)
    for col in ("status", "size", "params comp/LM", "min TRA", "max loss", "held-out TRA"):
        table.add_column(col, justify="right")
    for r in rows:
        status = "ok" if r["ok"] else "[red]CORRUPTED[/]"
        params = r["params"] or {}
        table.add_row(r["name"], status,
                      "-" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f} MiB",
                      f"{_short(params.get('compressor'))}/{_short(params.get('lm'))}",
                      _fmt(r["threshold"]), _fmt(r["loss_threshold"]), _fmt(r["tra_mean"]))
    console.print(table)
    for r in rows:
        if not r["ok"]:
            console.print(f"[red]corrupted:[/] {r['error']} (unmount and mount it again)")
    from cir.router.routing import by_chunk_length, chunk_length_groups

    by_len = by_chunk_length((r["name"], r["seq_len"]) for r in rows if r["seq_len"] is not None)
    if len(by_len) > 1:
        console.print(f"[red]chunk lengths differ[/] (tokens: {chunk_length_groups(by_len)}): "
                      "`route-cli score` refuses this registry until the odd experts are unmounted")


# ----------------------------------------------------------------------------- quickstart


def quickstart_cmd(
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    force: bool = typer.Option(False, "--force", help="Unmount everything and rebuild from scratch."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Mount experts on built-in local corpora in a minute or two, then score samples.

    The corpora: python-code, python-docs, and c-code or man-pages where present; about
    a minute on a 2-core CPU. A second run reuses the registry.

    Example: route-cli quickstart
    """
    import torch
    from cir.router.quickstart import quickstart

    if threads:
        torch.set_num_threads(threads)
    with progress(disable=as_json) as bar:
        task = bar.add_task("quickstart", total=None, info="")
        res = quickstart(registry, force=force, on_event=_mount_progress(bar, task))
    if not as_json:
        _warn_not_loaded(res.errors)
    if as_json:
        print_json({"registry": str(res.registry), "domains": res.domains,
                    "mounted": res.mounted, "reused": res.reused, "timings": res.timings,
                    "corrupted": [{"name": n, "error": e} for n, e in res.errors],
                    "samples": [r.to_dict() for r in res.reports]})
        return
    console.print(f"registry [bold]{res.registry}[/]: mounted {res.mounted or 'none'}, "
                  f"reused {res.reused or 'none'} ({res.timings['total_s']:.0f} s)")
    for report in res.reports:
        render_report(report)
    console.print("next: [bold]route-cli score FILE[/], [bold]route-cli experts[/], "
                  "[bold]route-cli mount NAME --source DIR[/]")


# ----------------------------------------------------------------------------- perplexity


def perplexity_cmd(
    target: str = typer.Argument(..., help="An LM checkpoint directory, or with --routed a text file."),
    data: str | None = typer.Option(None, "--data", help="Dataset name or directory (with a checkpoint TARGET)."),
    split: str = typer.Option("val", "--split", help="Dataset split for --data."),
    max_chunks: int | None = typer.Option(None, "--max-chunks", help="Evaluate at most this many chunks."),
    routed: bool = typer.Option(False, "--routed", help="TARGET is a file: each chunk scored by its routed expert's LM."),
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Perplexity of an LM on a dataset, or of routed experts on a file.

    With --routed: next to the oracle routing (best LM per chunk) and every single
    expert, so the gain of routing shows; binary, empty and whitespace-only files are
    skipped as by `score` (exit code 1).

    Example: route-cli perplexity notes.md --routed
    """
    if max_chunks is not None and max_chunks < 1:
        fail(f"--max-chunks must be >= 1, got {max_chunks}")
    if routed:
        _routed_perplexity(target, registry, as_json, max_chunks)
        return
    if data is None:
        fail("give --data DATASET with a checkpoint TARGET, or --routed with a file")
    from cir.experts.evaluate import dataset_perplexity

    out = dataset_perplexity(target, data, max_chunks=max_chunks, split=split)
    row = {k: out[k] for k in ("ppl", "nll_per_token", "n_chunks", "total_tokens")}
    if as_json:
        print_json({"target": target, "data": data, "split": split, **row})
    else:
        console.print(f"{target} on {data}/{split}: perplexity [bold]{row['ppl']:.3f}[/] "
                      f"({row['n_chunks']} chunks, {row['total_tokens']:,} tokens)")


def _routed_perplexity(path: str, registry: Path | None, as_json: bool,
                       max_chunks: int | None) -> None:
    from cir.router.continual import lm_comparison
    from cir.router.routing import seq_len_of
    from cir.router.score import FileReport, read_chunks

    reg = _registry(registry)
    experts, tok, _ = _load_experts(reg, as_json)
    got = read_chunks(path, tok, seq_len_of(experts), max_chunks)
    if isinstance(got, FileReport):  # the statuses of `score`
        if as_json:
            print_json({"file": path, "status": got.status, "reason": got.reason})
        else:
            render_report(got)
        raise typer.Exit(1)
    ids, mask, warnings = got
    out = lm_comparison(experts, ids, mask)
    if as_json:
        print_json({"file": path, "status": "ok", "warnings": warnings, **out})
        return
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    table = Table(title=f"{path}: {out['n_chunks']} chunks, {out['n_tokens']:,} predicted tokens")
    table.add_column("LM choice")
    table.add_column("perplexity", justify="right")
    table.add_row("routed (lowest reconstruction loss)", _fmt(out["routed"]))
    table.add_row("oracle (best LM per chunk)", _fmt(out["oracle"]))
    for name, ppl in out["single"].items():
        table.add_row(f"always {name}", _fmt(ppl))
    console.print(table)


# ----------------------------------------------------------------------------- bench


def continual_cmd(
    preset: str = typer.Option("quick", "--preset", help="quick (the quickstart settings) | debug | small."),
    domains: str | None = typer.Option(None, "--domains", help="Three sources A,B,C (default: the quickstart domains)."),
    eval_chunks: int = typer.Option(32, "--eval-chunks", min=1, help="Held-out chunks per domain."),
    workdir: Path | None = typer.Option(None, "--workdir", help="Scratch directory (default: $CIR_HOME/bench/continual)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Continual learning: mount A and B, then C; compare with one LM fine-tuned in turn.

    Measures routing accuracy and routed perplexity on held-out data after A + B and
    again after C, next to one LM fine-tuned on A, then B, then C.

    Example: route-cli bench continual --preset quick
    """
    from cir.router.continual import ContinualConfig, run_continual
    from cir.router.quickstart import QUICK, quick_domains

    from cir.paths import cir_home

    names = domains.split(",") if domains else quick_domains()
    if len(names) != 3:
        fail(f"--domains needs three sources, got {names}")
    mount_cfg = QUICK if preset == "quick" else {"preset": preset}
    cfg = ContinualConfig(tuple(names), workdir or cir_home() / "bench" / "continual",
                          mount=dict(mount_cfg), eval_chunks=eval_chunks)
    with progress(disable=as_json) as bar:
        task = bar.add_task("continual", total=None, info="")
        out = run_continual(cfg, on_event=_mount_progress(bar, task))
    if as_json:
        print_json(out)
        return
    _render_continual(out)


def _render_continual(out: dict[str, Any]) -> None:
    a, b, c = out["domains"]
    table = Table(title=f"mounting C={c} after A={a}, B={b} ({out['wall_s']:.0f} s)")
    table.add_column("held-out", no_wrap=True)
    for col in ("route acc A+B", "route acc +C", "routed ppl A+B", "routed ppl +C",
                "oracle ppl +C", "seq. LM ppl after B", "seq. LM ppl after C"):
        table.add_column(col, justify="right")
    seq = {s["after"]: s["ppl"] for s in out["sequential"]}
    for name in (a, b, c):
        before, after = out["before"].get(name, {}), out["after"][name]
        table.add_row(name, _fmt(before.get("routing_accuracy"), ".1%"),
                      _fmt(after["routing_accuracy"], ".1%"), _fmt(before.get("routed"), ".2f"),
                      _fmt(after["routed"], ".2f"), _fmt(after["oracle"], ".2f"),
                      _fmt(seq[b].get(name), ".2f"), _fmt(seq[c].get(name), ".2f"))
    console.print(table)
    console.print(f"sequential LM on {a} after each stage: " + ", ".join(
        f"{s['after']}: {s['ppl'][a]:.2f}" for s in out["sequential"]))


def routing_bench_cmd(
    registry: Path | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    ood: list[str] = typer.Option([], "--ood", help="Unmounted source(s) used as OOD data (besides random)."),
    eval_chunks: int = typer.Option(64, "--eval-chunks", min=1, help="Held-out chunks per set."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Routing accuracy and OOD AUROC of the mounted experts.

    Accuracy on every mounted domain's held-out chunks; AUROC against random tokens and
    unmounted sources.

    Example: route-cli bench registry --ood man-pages
    """
    from cir.router.continual import evaluate_routing

    reg = _registry(registry)
    experts, _, _ = _load_experts(reg, as_json)
    sets = {"random": _random_chunks(experts, eval_chunks)}
    for source in ood:
        sets[source] = _source_chunks(reg, source, experts, eval_chunks)
    out = evaluate_routing(reg, experts, eval_chunks, sets)
    if as_json:
        print_json({"registry": str(reg.root), **out})
        return
    table = Table(title="routing on held-out chunks")
    for col in ("set", "routing accuracy", "flagged unknown", "AUROC (TRA)", "AUROC (loss)", "chunks"):
        table.add_column(col, justify="right")
    for name, r in out["domains"].items():
        table.add_row(name, _fmt(r["accuracy"], ".1%"), _fmt(r["unknown"], ".1%"), "-", "-",
                      str(r["n_chunks"]))
    for name, r in out["ood"].items():
        table.add_row(f"OOD {name}", "-", _fmt(r["flagged_unknown"], ".1%"),
                      _fmt(r["auroc_tra"]), _fmt(r["auroc_loss"]), str(r["n_chunks"]))
    console.print(table)


def _random_chunks(experts: list[Any], n: int) -> tuple[Any, Any]:
    from cir.data import open_dataset
    from cir.router.routing import seq_len_of

    ds = open_dataset("random", "test", seq_len=seq_len_of(experts),
                      vocab_size=experts[0].compressor.config.vocab_size, n_chunks=n)
    return ds.get_batch(list(range(n)))


def _source_chunks(reg: Any, source: str, experts: list[Any], n: int) -> tuple[Any, Any]:
    """Chunks of an unmounted source, built once with the registry tokenizer."""
    import hashlib

    import numpy as np
    from cir.data import build_dataset, open_dataset
    from cir.router.routing import seq_len_of

    from cir.paths import cir_home

    key = hashlib.sha256(f"{source}|{reg.tokenizer_hash()}".encode()).hexdigest()[:16]
    out = cir_home() / "bench" / "ood" / key
    if not (out / "manifest.json").is_file():
        build_dataset(out, source, tokenizer=reg.tokenizer_path, seq_len=seq_len_of(experts),
                      max_tokens=n * 512 * 2, overwrite=True)
    ds = open_dataset(out, "train")  # an unmounted source: every split is unseen
    return ds.get_batch(np.arange(min(n, len(ds))))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the top-level app and the `bench` group."""
    for name, fn in (("score", score_cmd), ("mount", mount_cmd), ("unmount", unmount_cmd),
                     ("experts", experts_cmd), ("quickstart", quickstart_cmd)):
        app.command(name)(handle_errors(fn))
    app.command("perplexity")(handle_errors(perplexity_cmd))
    bench.command("continual")(handle_errors(continual_cmd))
    bench.command("registry")(handle_errors(routing_bench_cmd))
