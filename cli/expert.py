"""`route-cli` commands of the expert group: `expert train`, `generate`, `bench decode`."""

from __future__ import annotations

import json
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

expert_app = typer.Typer(help="Expert language models (TLinFormer and baselines).",
                         no_args_is_help=True)


@expert_app.command("train")
@handle_errors
def train_cmd(
    data: str = typer.Option(..., "--data", help="Dataset name or directory (route-cli data build)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory (re-run to resume)."),
    arch: str = typer.Option("tlinformer", help="tlinformer | tconstformer | transformer"),
    preset: str = typer.Option("small", help="debug | small | paper-41m"),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(16, help="Chunks per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    optimizer: str = typer.Option("adamw", help=OPTIMIZER_HELP),
    warmup_steps: int = typer.Option(100),
    eval_every: int = typer.Option(200),
    ckpt_every: int = typer.Option(200),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    seed: int = typer.Option(0),
    set_: list[str] = typer.Option([], "--set", help="Model config override key=value."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train an expert LM on a chunk dataset.

    Example: route-cli expert train --data python-code --out runs/tlin --arch tlinformer
    --preset small --steps 500
    """
    from cir.experts.train import train_expert

    from cir.train import TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      warmup_steps=warmup_steps,
                      eval_every=eval_every, ckpt_every=ckpt_every, device=device, seed=seed)
    with resumable(out), progress(disable=as_json) as bar:
        task = bar.add_task(f"train {arch}", total=steps, info="")

        def on_log(rec: dict[str, Any]) -> None:
            if rec.get("event") == "train":
                bar.update(task, completed=rec["step"], info=f"loss {rec['loss']:.3f}")
            elif rec.get("event") == "eval":
                bar.update(task, info=f"val_loss {rec.get('val_loss', float('nan')):.3f}")

        result = train_expert(data, out, arch=arch, preset=preset, train_cfg=cfg,
                              overrides=parse_overrides(set_), on_log=on_log)
    print_train_result(f"{arch} ({preset})", result, as_json)


@handle_errors
def generate_cmd(
    ckpt: Path = typer.Argument(..., help="Expert LM checkpoint directory."),
    prompt: str = typer.Option("", "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, min=0, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: int = typer.Option(50, min=0, help="Sample from the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Continue a prompt with an expert LM (cached decoding).

    Example: route-cli generate runs/tlin --prompt "def main(" --max-new-tokens 80
    """
    import torch
    from cir.data import load_tokenizer
    from cir.experts.generate import generate

    from cir.checkpoint import TOKENIZER_FILE, load_checkpoint

    tok_path = ckpt / TOKENIZER_FILE
    if not tok_path.is_file():
        fail(f"{ckpt}: no {TOKENIZER_FILE} next to the model")
    tokenizer = load_tokenizer(tok_path)
    model = load_checkpoint(ckpt, device=device)
    ids = tokenizer.encode(prompt).ids or [1]  # an empty prompt starts after EOS
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature,
                   top_k=top_k or None, seed=seed)
    new = out[0, len(ids):].tolist()
    text = tokenizer.decode(new)
    if as_json:
        print_json({"prompt": prompt, "completion": text, "prompt_ids": ids, "new_ids": new})
        return
    console.print(prompt + text, highlight=False, markup=False)


@handle_errors
def bench_decode_cmd(
    preset: str = typer.Option("small", help="Model preset shared by every model."),
    models: str = typer.Option("tlinformer,tconstformer,transformer-static,transformer-concat",
                               help="Comma-separated benchmark models."),
    n: list[int] = typer.Option([], "--n", help="Context lengths (repeatable); default "
                                "1K..32K on CPU, 1K..4M on CUDA."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("", help="float32 | bfloat16 (default: bf16 on CUDA)"),
    steps: int = typer.Option(8, help="Cache-hit steps timed per N and path (median)."),
    max_memory_gb: float = typer.Option(0.0, help="CUDA memory budget in GiB (0 = all)."),
    time_budget_s: float = typer.Option(420.0, help="Wall-time budget shared by the models "
                                        "(sweep and largest-N search)."),
    cuda_graphs: bool | None = typer.Option(
        None, "--cuda-graphs/--no-cuda-graphs",
        help="Time the static-shape hit step in a CUDA graph (default: on for CUDA; on CPU "
             "--cuda-graphs runs that step uncaptured)."),
    max_n_search: bool | None = typer.Option(
        None, "--max-n-search/--no-max-n-search",
        help="Search the largest N before out-of-memory (default: on for CUDA)."),
    out: Path = typer.Option(None, "--out", help="Folder for bench.json and bench.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Per-token decode latency (cache hit / miss) and cache memory, random weights.

    Also the bandwidth bound and the largest N before out-of-memory.

    Example: route-cli bench decode --preset small --n 1024 --n 4096 --n 32768
    """
    from cir.experts.bench import decode_bench, plot_decode

    from cir.paths import cir_home

    names = [m.strip() for m in models.split(",") if m.strip()]
    out = out or cir_home() / "bench" / f"decode-{preset}-{device}"
    out.mkdir(parents=True, exist_ok=True)
    with progress(disable=as_json) as bar:
        task = bar.add_task("decode bench", total=None, info="")

        def on_point(p) -> None:
            bar.update(task, advance=1, info=f"{p.model} N={p.n}")

        def on_model(partial) -> None:  # keep what is done if a later model is cut short
            _write_bench_json(partial, out / "bench.json", done=False)

        result = decode_bench(preset, names, n or None, device, dtype or None, steps,
                              max_memory_gb or None, time_budget_s or None,
                              cuda_graphs=cuda_graphs, max_n_search=max_n_search,
                              on_point=on_point, on_model=on_model)
    payload = _write_bench_json(result, out / "bench.json", done=True)
    png = plot_decode(result, out / "bench.png")
    if as_json:
        print_json({**payload, "json": str(out / "bench.json"), "png": str(png)})
        return
    _render_bench(result, payload)
    console.print(f"wrote {out / 'bench.json'} and {png}")


def _write_bench_json(result, path: Path, done: bool) -> dict[str, Any]:
    from cir.experts.bench import headline_ratios, ratios

    payload = {**result.to_dict(), "ratios": ratios(result),
               "headline": headline_ratios(result), "complete": done}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".3g") -> str:
    return "-" if value is None else format(value / scale, spec)


def _render_bench(result, payload: dict[str, Any]) -> None:
    table = Table(title=f"decode: {result.preset} on {result.device} ({result.dtype})")
    for col in ("model", "N", "hit ms", "path", "eager hit ms", "miss ms", "ideal hit ms",
                "BW eff", "cache MiB", "peak MiB", "GFLOP hit", "GFLOP miss"):
        table.add_column(col, justify="right")
    for p in result.points:
        path = {"cuda-graph": "graph", "static-step": "static"}.get(p.hit_path or "", "eager")
        table.add_row(p.model, str(p.n), _fmt(p.hit_ms), path if not p.error else "-",
                      _fmt(p.hit_eager_ms), _fmt(p.miss_ms), _fmt(p.ideal_hit_ms, 1, ".2g"),
                      _fmt(p.efficiency, 0.01, ".2g") + ("%" if p.efficiency else ""),
                      _fmt(p.cache_bytes, 2**20), _fmt(p.peak_bytes, 2**20),
                      _fmt(p.flops_hit, 1e9), _fmt(p.flops_miss, 1e9) if not p.error
                      else p.error)
    console.print(table)
    head = payload.get("headline")
    if head:
        ratio = Table(title=f"baseline / tlinformer at N={head['n']}",
                      caption=f"N: the largest that tlinformer, {', '.join(head['compared'])}"
                              " all measured; max N: tlinformer / baseline")
        for col in ("baseline", "hit", "hit eager", "miss", "cache bytes", "max N"):
            ratio.add_column(col, justify="right")
        for r in head["rows"]:
            ratio.add_row(r["baseline"], f"{r['hit']:.2f}x", _fmt(r["hit_eager"], 1, ".2f")
                          + "x", f"{r['miss']:.2f}x", _fmt(r["cache"], 1, ".2f") + "x",
                          _fmt(r["max_n"], 1, ".2f") + "x")
        console.print(ratio)
    if result.bandwidth_bytes_per_s:
        console.print(f"copy bandwidth {result.bandwidth_bytes_per_s / 1e9:.0f} GB/s (read + "
                      "write): ideal hit ms = bytes read per token / bandwidth")
    budget = (f"{result.memory_budget_bytes / 2**30:.1f} GiB budget"
              if result.memory_budget_bytes else "whole device")
    for name, m in result.max_n.items():
        peak = m.get("peak_bytes_at_fits")
        extra = (f", {len(m['probes'])} probes" if "probes" in m else "") + (
            f", peak {peak / 2**30:.1f} GiB" if peak else "")
        console.print(f"{name}: largest N {m['fits']}, OOM at {m['oom_at'] or '-'} "
                      f"({budget}{extra})")
    for name, how in result.cuda_graphs.items():
        console.print(f"{name}: hit path {how}")
    for note in result.notes:
        console.print(f"note: {note}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the top-level app and the `bench` group."""
    app.add_typer(expert_app, name="expert")
    app.command("generate")(generate_cmd)
    bench.command("decode")(bench_decode_cmd)
