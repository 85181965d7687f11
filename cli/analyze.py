"""`route-cli` analysis commands: `analyze table | plot`, `index build`, `explain`,
`bench routing`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import typer
from cir.cli.common import console, err_console, fail, handle_errors, print_json, progress
from rich.table import Table

analyze_app = typer.Typer(help="TRA tables and latent-space plots of compressors.",
                          no_args_is_help=True)
index_app = typer.Typer(help="A faiss index over the experts' training latents.",
                        no_args_is_help=True)


def _pairs(items: list[str], what: str = "--data", form: str = "EXPERT=DATASET") -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            fail(f"{what} expects {form}, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def _compressor(ckpt: Path, device: str = "cpu") -> Any:
    from cir.checkpoint import load_checkpoint

    return load_checkpoint(ckpt, device=device, expect="compressor")


def _model_name(ckpt: Path) -> str:
    """``EXPERT/compressor`` for a registry expert's checkpoint, else the directory name."""
    ckpt = Path(ckpt).resolve()
    return f"{ckpt.parent.name}/{ckpt.name}" if ckpt.name == "compressor" else ckpt.name


def _registry(path: Path | None) -> Any:
    from cir.router.registry import Registry

    return Registry(path)


# ---------------------------------------------------------------- analyze table


def _table_datasets(model: Any, in_domain: list[str], semi: list[str], full: list[str],
                    split: str) -> dict[str, tuple[str, Any]]:
    from cir.router.analysis import dataset_label, open_eval_dataset

    out: dict[str, tuple[str, Any]] = {}
    for role, names in (("in-domain", in_domain), ("semi-OOD", semi), ("full-OOD", full)):
        for name in names:
            label = dataset_label(name)
            if label in out:
                fail(f"two datasets are labelled {label!r} ({name}); give them distinct names")
            out[label] = (role, open_eval_dataset(name, split, like=model))
    return out


def _matrix_rows(registry: Path | None, data: list[str], full: list[str], split: str,
                 max_chunks: int | None, bar: Any) -> list[Any]:
    from cir.router.analysis import open_eval_dataset, registry_domains, tra_matrix

    domains = registry_domains(_registry(registry), _pairs(data))
    first = next(iter(domains.values()))[0].compressor
    datasets = {name: open_eval_dataset(spec, split) for name, (_, spec) in domains.items()}
    datasets.update({name: open_eval_dataset(name, split, like=first) for name in full})
    total = len(domains) * sum(min(len(d), max_chunks or len(d)) for d in datasets.values())
    task = bar.add_task("score", total=total, info="")
    comps = {name: e.compressor for name, (e, _) in domains.items()}
    return tra_matrix(comps, datasets, max_chunks=max_chunks, full_ood=full,
                      on_batch=lambda n, k: bar.update(task, advance=k, info=n))


@analyze_app.command("table")
@handle_errors
def table_cmd(
    compressor: Path | None = typer.Option(None, "--compressor", help="Compressor checkpoint."),
    in_domain: list[str] = typer.Option([], "--in-domain", help="In-domain dataset; repeat."),
    semi_ood: list[str] = typer.Option([], "--semi-ood", help="Semi-OOD dataset; repeat."),
    full_ood: list[str] = typer.Option(["random"], "--full-ood",
                                       help="Full-OOD dataset (random = uniform tokens)."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry: matrix of every "
                                         "expert's compressor x every domain."),
    data: list[str] = typer.Option([], "--data", help="With --registry: EXPERT=DATASET when "
                                   "meta.json does not name the dataset."),
    split: str = typer.Option("test", help="Split of every dataset: train | val | test."),
    max_chunks: int | None = typer.Option(None, help="Chunks per dataset (evenly spread)."),
    device: str = typer.Option("cpu", help="cpu | cuda (with --compressor)"),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Also write the table as CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """The in-domain / semi-OOD / full-OOD TRA table of a compressor.

    With --registry: a matrix of every expert's compressor on every domain's held-out data.

    Example: route-cli analyze table --compressor runs/cmp --in-domain python-code
    --semi-ood python-docs --full-ood random --max-chunks 200
    """
    from cir.router.analysis import table_to_csv, table_to_markdown, tra_table

    if compressor is not None and registry is not None:
        fail("give either --compressor (with --in-domain/--semi-ood) or --registry, not both")
    with progress(disable=as_json or markdown) as bar:
        if compressor is None:
            rows = _matrix_rows(registry, data, full_ood, split, max_chunks, bar)
        else:
            if not in_domain:
                fail("--compressor needs at least one --in-domain dataset")
            model = _compressor(compressor, device)
            sets = _table_datasets(model, in_domain, semi_ood, full_ood, split)
            task = bar.add_task("score", total=sum(min(len(d), max_chunks or len(d))
                                                   for _, d in sets.values()), info="")
            rows = tra_table(model, sets, name=_model_name(compressor), max_chunks=max_chunks,
                             on_batch=lambda n, k: bar.update(task, advance=k, info=n))
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(table_to_csv(rows))
    if as_json:
        print_json({"split": split, "rows": [r.to_dict() for r in rows],
                    "csv": str(csv_path) if csv_path else None})
    elif markdown:
        print(table_to_markdown(rows))
    else:
        _print_table(rows, split)


def _print_table(rows: list[Any], split: str) -> None:
    table = Table(title=f"token reconstruction accuracy ({split} split)")
    cols = ("compressor", "dataset", "role", "chunks", "tokens", "TRA", "TRA/chunk", "CE")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:3] else "right")
    style = {"in-domain": "green", "semi-OOD": "yellow", "full-OOD": "red"}
    for r in rows:
        table.add_row(r.compressor, r.dataset, f"[{style[r.role]}]{r.role}[/]", str(r.chunks),
                      f"{r.tokens:,}", f"{100 * r.tra:.2f}%", f"{100 * r.tra_chunk_mean:.2f}%",
                      f"{r.loss:.3f}")
    console.print(table)


# ---------------------------------------------------------------- analyze plot


@analyze_app.command("plot")
@handle_errors
def plot_cmd(
    compressor: Path = typer.Option(..., "--compressor", help="Compressor checkpoint."),
    data: list[str] = typer.Option(..., "--data", help="Dataset (or random), optionally "
                                   "LABEL=DATASET; repeat."),
    method: list[str] = typer.Option(["umap", "tsne", "pca"], "--method",
                                     help="umap | tsne | pca; repeat."),
    pooling: str = typer.Option("flat", help="flat ([8*d]) | mean (\\[d]) latents."),
    split: str = typer.Option("test", help="Split of every dataset."),
    max_chunks: int = typer.Option(300, help="Chunks per dataset (evenly spread)."),
    seed: int = typer.Option(0, help="random_state of t-SNE / UMAP and the CV folds."),
    device: str = typer.Option("cpu", help="cpu | cuda: where the chunks are encoded."),
    out: Path | None = typer.Option(None, "--out", help="Output dir (default "
                                    "$CIR_HOME/plots/latents)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Latent-space plots (UMAP / t-SNE / PCA) of held-out chunks coloured by domain.

    Also measures linear separability, silhouette and PCA-95% components; writes PNG +
    CSV coordinates + a summary JSON.

    Example: route-cli analyze plot --compressor runs/cmp --data python-code
    --data python-docs --data random --method umap --method tsne
    """
    from cir.router.analysis import (
        collect_latents,
        dataset_label,
        latent_plots,
        open_eval_dataset,
        pool_latents,
    )

    from cir.paths import cir_home

    model = _compressor(compressor, device)
    pairs = [item.split("=", 1) if "=" in item else (dataset_label(item), item) for item in data]
    specs = dict(pairs)
    if len(specs) < len(pairs):
        fail("two --data sets share a label; name them LABEL=DATASET")
    sets = {label: open_eval_dataset(spec, split, like=model) for label, spec in specs.items()}
    title = _model_name(compressor)
    out = out or cir_home() / "plots" / "latents"
    with progress(disable=as_json) as bar:
        task = bar.add_task("latents", total=len(method) + 1, info="encode")
        z, labels = collect_latents(model, sets, max_chunks=max_chunks)
        bar.update(task, advance=1)
        report = latent_plots(pool_latents(z, pooling), labels, out, methods=method,
                              pooling=pooling, title=title, seed=seed,
                              on_method=lambda m: bar.update(task, advance=1, info=m))
    if as_json:
        print_json(report.to_dict())
        return
    s = report.summary
    table = Table(title=f"latents of {title} ({pooling}, {s['dim']} dims)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("chunks", ", ".join(f"{k} {v}" for k, v in s["domains"].items()))
    table.add_row("linear separability (5-fold CV)", f"{100 * s['linear_separability']:.2f}%")
    table.add_row("silhouette", f"{s['silhouette']:.3f}")
    table.add_row("PCA components for 95% var.", f"{s['pca_components_95']} / {s['dim']}")
    for dom, n in s["pca_components_95_by_domain"].items():
        table.add_row(f"  PCA-95% of {dom} alone", f"{n} / {s['dim']}")
    if "without_random" in s:
        w = s["without_random"]
        table.add_row("without random: linear sep.", f"{100 * w['linear_separability']:.2f}%")
        table.add_row("without random: silhouette", f"{w['silhouette']:.3f}")
    for m, p in report.plots.items():
        table.add_row(f"{m} plot", str(p))
    console.print(table)


# ---------------------------------------------------------------- index build / explain


@index_app.command("build")
@handle_errors
def index_build_cmd(
    registry: Path | None = typer.Option(None, "--registry", help="Registry directory."),
    data: list[str] = typer.Option([], "--data", help="EXPERT=DATASET when meta.json does "
                                   "not name the dataset."),
    out: Path | None = typer.Option(None, "--out", help="Write OUT/EXPERT instead of "
                                    "REGISTRY/EXPERT/latent_index."),
    pooling: str = typer.Option("flat", help="flat | mean latents."),
    split: str = typer.Option("train", help="Split whose chunks are indexed."),
    max_chunks: int | None = typer.Option(2000, help="Chunks per expert (evenly spread)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Index every expert's training-chunk latents (faiss) with a text-snippet sidecar.

    Example: route-cli index build --max-chunks 2000
    """
    from cir.data import load_tokenizer
    from cir.router.analysis import open_eval_dataset, registry_domains
    from cir.router.latent_index import build_index, index_dir

    reg = _registry(registry)
    domains = registry_domains(reg, _pairs(data))
    tok = load_tokenizer(reg.tokenizer_path) if reg.has_tokenizer() else None
    built = []
    with progress(disable=as_json) as bar:
        for name, (expert, spec) in domains.items():
            ds = open_eval_dataset(spec, split)
            task = bar.add_task(f"index {name}", total=min(len(ds), max_chunks or len(ds)),
                                info="")
            index = build_index(expert.compressor, ds, pooling=pooling, max_chunks=max_chunks,
                                tokenizer=tok, dataset_name=spec,
                                on_batch=lambda n, t=task: bar.update(t, advance=n))
            target = index_dir(expert.info.path, out, name)
            if out is None:
                with reg.lock():
                    index.save(target)
            else:
                index.save(target)
            built.append({"expert": name, "dataset": spec, "vectors": len(index),
                          "dim": index.dim, "path": str(target)})
    if as_json:
        print_json({"pooling": pooling, "split": split, "indexes": built})
        return
    table = Table(title=f"latent indexes ({pooling}, {split} split)")
    for col in ("expert", "dataset", "vectors", "dim", "path"):
        table.add_column(col)
    for b in built:
        table.add_row(b["expert"], b["dataset"], str(b["vectors"]), str(b["dim"]), b["path"])
    console.print(table)


@handle_errors
def explain_cmd(
    file: str = typer.Argument(..., help="Text file to explain ('-': standard input)."),
    k: int = typer.Option(3, "--k", min=1, help="Nearest training chunks per expert."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry directory."),
    index: Path | None = typer.Option(None, "--index", help="Indexes built with "
                                      "`index build --out DIR` (default: in the registry)."),
    max_chunks: int | None = typer.Option(20, min=1, help="First chunks of the file to explain."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Explain a route: each chunk's nearest training chunks under every expert.

    For each chunk of FILE: every expert's reconstruction loss and its k nearest training
    chunks in latent space (text snippet and source), from `route-cli index build`.
    Binary, empty and whitespace-only files are refused as `score` skips them.

    Example: route-cli explain mycode.py --k 3
    """
    from cir.data import load_tokenizer
    from cir.router.latent_index import LatentIndex, explain_chunks, index_dir
    from cir.router.score import FileReport, read_chunks

    reg = _registry(registry)
    loaded = reg.load()
    if loaded.errors or not loaded.experts:
        fail(loaded.errors[0][1] if loaded.errors else f"registry {reg.root} has no experts")
    tok = load_tokenizer(reg.tokenizer_path)
    got = read_chunks(file, tok, loaded.experts[0].compressor.config.seq_len, max_chunks)
    if isinstance(got, FileReport):
        fail(f"{file}: {got.reason}" + (": nothing to explain" if got.status == "skipped" else ""))
    ids, mask, warnings = got
    experts = {e.name: (e.compressor, LatentIndex.load(index_dir(e.info.path, index, e.name)))
               for e in loaded.experts}
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    rows = explain_chunks(ids, mask, experts, k=k, tokenizer=tok)
    if as_json:
        print_json({"file": file, "k": k, "warnings": warnings, "chunks": rows})
        return
    for row in rows:
        table = Table(title=f"chunk {row['chunk']} -> {row['route']}: {row['text'][:70]!r}",
                      title_justify="left")
        for col in ("expert", "loss", "TRA", "dist", "source", "nearest training text"):
            table.add_column(col, overflow="fold")
        for name, e in row["experts"].items():
            for j, nb in enumerate(e["neighbours"]):
                src = nb.get("source") or f"{nb.get('dataset', '')}#{nb.get('chunk', '')}"
                if "part" in nb:  # which chunk of that document
                    src = f"{src} (chunk {nb['part'] + 1})"
                table.add_row(name if j == 0 else "", f"{e['loss']:.3f}" if j == 0 else "",
                              f"{100 * e['tra']:.1f}%" if j == 0 else "",
                              f"{nb['distance']:.2f}", str(src), nb.get("text", "")[:100])
        console.print(table)


# ---------------------------------------------------------------- bench routing


def _bench_domains(registry: Path | None, data: list[str], with_lm: bool,
                   compressors: list[str], device: str) -> Any:
    """``{domain: DomainModels}`` of a registry's experts, or of compressor checkpoints
    (``NAME=CKPT``, each with its ``--data NAME=DATASET``) without LMs."""
    from cir.router.analysis import open_eval_dataset, registry_domains
    from cir.router.baselines import DomainModels

    from cir.checkpoint import check_tokenizer

    specs = _pairs(data)
    if not compressors:
        domains = {name: (expert.compressor, expert.lm() if with_lm else None, spec)
                   for name, (expert, spec) in registry_domains(_registry(registry),
                                                                specs).items()}
        ckpts = {}
    else:
        if registry is not None:
            fail("give either --registry or --compressor NAME=CKPT, not both")
        ckpts = _pairs(compressors, "--compressor", "NAME=CKPT")
        if set(ckpts) != set(specs):
            fail("every --compressor NAME=CKPT needs one --data NAME=DATASET; unpaired: "
                 + ", ".join(sorted(set(ckpts) ^ set(specs))))
        domains = {name: (_compressor(Path(ckpt), device), None, specs[name])
                   for name, ckpt in ckpts.items()}
    out = {name: DomainModels(comp, lm, open_eval_dataset(spec, "train"),
                              open_eval_dataset(spec, "test"))
           for name, (comp, lm, spec) in domains.items()}
    for ckpt in ckpts.values():  # every compressor scores every domain's chunks
        for d in out.values():
            check_tokenizer(ckpt, d.test)
    return out


@handle_errors
def bench_routing_cmd(
    registry: Path | None = typer.Option(None, "--registry", help="Registry directory."),
    data: list[str] = typer.Option([], "--data", help="EXPERT=DATASET when meta.json does "
                                   "not name the dataset."),
    ood: list[str] = typer.Option(["random"], "--ood", help="OOD dataset (random, or a "
                                  "domain not mounted); repeat."),
    max_train: int | None = typer.Option(None, min=1, help="Training chunks per domain the "
                                         "baselines are fitted on, spread evenly (default: "
                                         "24,000, at least a `small` compressor's training "
                                         "data; all of them when fewer)."),
    max_train_latent: int = typer.Option(200, min=1, help="At most this many of them for the "
                                         "baselines on latents (an encoder pass each)."),
    max_test: int = typer.Option(200, help="Held-out chunks per domain."),
    with_lm: bool = typer.Option(True, "--lm/--no-lm", help="Include likelihood routing "
                                 "(scores every expert LM)."),
    compressor: list[str] = typer.Option([], "--compressor", help="NAME=CKPT: route among "
                                         "compressor checkpoints instead of a registry "
                                         "(no LMs); each with --data NAME=DATASET."),
    device: str = typer.Option("cpu", help="cpu | cuda (with --compressor)."),
    pooling: str = typer.Option("mean", help="Latent pooling of mahalanobis / knn: flat | mean."),
    method: list[str] = typer.Option([], "--method", help="Only this method; repeat "
                                     "(default: all). reconstruction | likelihood | gate-emb "
                                     "| gate-tfidf | tfidf-kmeans | mahalanobis | knn-latent | "
                                     "unigram-mix."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Reconstruction routing against likelihood, gating, c-BTM, Mahalanobis, kNN and unigrams.

    Likelihood routing (DEMix/BTM), a trained gate, c-BTM tf-idf + k-means, Mahalanobis and
    kNN on latents, and each domain's mixture of unigrams (no network): accuracy, OOD
    AUROC / FPR@95, cost, and what a new domain needs (and, with 3+ domains, accuracy after
    mounting the last).

    Example: route-cli bench routing --ood random --max-test 200

    Compressors trained with `compressor train`, without mounting them: route-cli bench
    routing --compressor code=runs/code --data code=python-code --compressor docs=runs/docs
    --data docs=python-docs --ood random

    Two methods only: route-cli bench routing --method reconstruction --method gate-tfidf
    """
    from cir.router.analysis import dataset_label, open_eval_dataset
    from cir.router.baselines import FEATURE_OF, bench_routing

    unknown = sorted(set(method) - set(FEATURE_OF))
    if unknown:
        raise typer.BadParameter(f"unknown method {', '.join(unknown)}; valid: "
                                 f"{', '.join(FEATURE_OF)}", param_hint="--method")
    if "likelihood" in method and (compressor or not with_lm):
        raise typer.BadParameter("likelihood routing needs the registry's expert LMs (not "
                                 "--no-lm, not --compressor)", param_hint="--method")
    if "knn-latent" in (method or FEATURE_OF) and importlib.util.find_spec("faiss") is None:
        fail("knn-latent routing needs faiss: pip install faiss-cpu, or leave it out by "
             "naming the other methods with --method")
    domains = _bench_domains(registry, data, with_lm, compressor, device)
    first = next(iter(domains.values())).compressor
    ood_sets = {dataset_label(name): open_eval_dataset(name, "test", like=first)
                for name in ood}
    with progress(disable=as_json) as bar:
        task = bar.add_task("routing baselines", total=None, info="features + fits")
        sizes = {} if max_train is None else {"max_train": max_train}  # else its default
        result = bench_routing(domains, ood_sets, max_test=max_test,
                               methods=list(dict.fromkeys(method)) or None, pooling=pooling,
                               max_train_latent=max_train_latent, **sizes)
        bar.update(task, total=1, completed=1)
    if as_json:
        print_json(result)
        return
    _print_bench(result)


def _print_bench(result: dict[str, Any]) -> None:
    oods = list(result["ood_sets"])
    table = Table(title=f"routing on {', '.join(result['domains'])} "
                        f"({result['n_test']} held-out chunks)")
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    for name in oods:
        table.add_column(f"AUROC {name}", justify="right")
        table.add_column(f"FPR95 {name}", justify="right")
    for col in ("ms/chunk", "GFLOPs/chunk", "new domain needs"):
        table.add_column(col, justify="left" if col == "new domain needs" else "right")
    for r in result["methods"]:
        cells = [r["method"], f"{100 * r['accuracy']:.1f}%"]
        for name in oods:
            cells += [f"{r['ood'][name]['auroc']:.3f}", f"{100 * r['ood'][name]['fpr95']:.1f}%"]
        fl = r.get("flops_per_chunk")
        cells += [f"{r['ms_per_chunk']:.2f}", "-" if fl is None else f"{fl / 1e9:.3f}",
                  r["on_mount"]]
        table.add_row(*cells)
    console.print(table)
    home = Table(title="held-out chunks routed to their own domain")
    home.add_column("method")
    for name in result["domains"]:
        home.add_column(name, justify="right")
    for r in result["methods"]:
        shares = (r["accuracy_by_domain"][name] for name in result["domains"])
        home.add_row(r["method"], *("-" if v is None else f"{100 * v:.1f}%" for v in shares))
    console.print(home)
    if result["mount"]:
        mt = Table(title=f"mounting {result['mounted_last']} as the last domain")
        for col in ("method", "acc. before", "acc. after", "old domains after", "update",
                    "update s"):
            mt.add_column(col, justify="left" if col in ("method", "update") else "right")
        for m in result["mount"]:
            mt.add_row(m["method"], f"{100 * m['accuracy_before']:.1f}%",
                       f"{100 * m['accuracy_after']:.1f}%",
                       f"{100 * m['old_domains_after']:.1f}%", m["update"],
                       f"{m['update_s']:.2f}")
        console.print(mt)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the top-level app and the `bench` group."""
    app.add_typer(analyze_app, name="analyze")
    app.add_typer(index_app, name="index")
    app.command("explain")(explain_cmd)
    bench.command("routing")(bench_routing_cmd)
