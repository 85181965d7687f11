"""Continual learning check: mounting a new expert does not hurt the old domains.

``run_continual``: in a fresh registry, mount domains A and B, measure routing accuracy
and routed perplexity on A's and B's held-out (``test``) chunks; mount C, measure again
on A, B and C. The forgetting baseline is one LM of the same size fine-tuned sequentially
on A, then B, then C; its perplexity on every domain seen so far is measured after each
stage. Routed perplexity uses, per chunk, the LM of the expert the router picked; the
oracle picks the LM with the lowest loss on that chunk.

Also here: :func:`lm_comparison` (routed vs oracle vs each single expert's LM on a set of
chunks), used by ``route-cli perplexity --routed``, and :func:`evaluate_routing` (routing
accuracy per mounted domain and OOD AUROC), used by ``route-cli bench routing``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cir.router.mount import LM_PRESET, LM_TRAIN, MountConfig, mount
from cir.router.registry import Expert, Registry
from cir.router.routing import RouteResult, ood_auroc, route_chunks, routing_accuracy

Event = Callable[[dict[str, Any]], None]


def _ppl(nll: torch.Tensor, n: torch.Tensor) -> float:
    total = float(n.sum())
    return math.exp(float(nll.sum()) / total) if total else float("nan")


def held_out_test(data: Path, max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``max_chunks`` chunks of a domain's ``test`` split (``val`` when the test
    split is empty), never its ``train`` split: what the expert trained on says nothing
    about held-out routing or perplexity."""
    import numpy as np
    from cir.data import open_dataset

    for split in ("test", "val"):
        ds = open_dataset(data, split)
        if len(ds):
            return ds.get_batch(np.arange(min(len(ds), max_chunks)))
    raise ValueError(f"{data}: no held-out (test or val) chunks to evaluate on; the corpus "
                     "has too few documents")


def lm_nll(experts: list[Expert], ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL ``[N, E]`` of every expert's LM and predicted tokens ``[N]``."""
    from cir.experts.evaluate import perplexity

    cols, count = [], None
    for expert in experts:
        out = perplexity(expert.lm(), ids, mask)
        cols.append(out["nll_sum"])  # [N]
        count = out["n_tokens"]  # [N], the same for every LM
    return torch.stack(cols, dim=1), count  # [N, E], [N]


def lm_comparison(experts: list[Expert], ids: torch.Tensor, mask: torch.Tensor,
                  route: RouteResult | None = None) -> dict[str, Any]:
    """Perplexity of routed, oracle (best LM per chunk) and each single expert's LM."""
    route = route or route_chunks(experts, ids, mask)
    nll, n = lm_nll(experts, ids, mask)  # [N, E], [N]
    per_tok = nll / n.clamp(min=1)[:, None]
    routed = nll.gather(1, route.route[:, None]).squeeze(1)  # [N]
    return {
        "routed": _ppl(routed, n),
        "oracle": _ppl(nll.gather(1, per_tok.argmin(1, keepdim=True)).squeeze(1), n),
        "single": {e.name: _ppl(nll[:, i], n) for i, e in enumerate(experts)},
        "n_chunks": int(ids.shape[0]),
        "n_tokens": int(n.sum()),
    }


def evaluate_routing(reg: Registry, experts: list[Expert], eval_chunks: int = 64,
                     ood: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Routing accuracy on each mounted domain's held-out ``test`` chunks, and AUROC of
    in-domain (all those chunks) vs each OOD set, by best TRA and by lowest loss."""
    domains: dict[str, Any] = {}
    results = []
    for expert in experts:
        ids, mask = held_out_test(reg.data_dir(expert.name), eval_chunks)
        res = route_chunks(experts, ids, mask)
        results.append(res)
        domains[expert.name] = {"accuracy": routing_accuracy(res, expert.name),
                                "unknown": float(res.unknown.float().mean()),
                                "n_chunks": len(res)}
    pooled = RouteResult.cat(results)
    out_ood = {}
    for name, (ids, mask) in (ood or {}).items():
        res = route_chunks(experts, ids, mask)
        out_ood[name] = {"auroc_tra": ood_auroc(pooled, res), "auroc_loss": _auroc_loss(pooled, res),
                         "flagged_unknown": float(res.unknown.float().mean()), "n_chunks": len(res)}
    return {"domains": domains, "ood": out_ood}


def _auroc_loss(in_domain: RouteResult, ood: RouteResult) -> float:
    from sklearn.metrics import roc_auc_score

    best = lambda r: -torch.nan_to_num(r.loss, nan=1e9).min(1).values  # noqa: E731
    scores = torch.cat([best(in_domain), best(ood)]).numpy()
    return float(roc_auc_score([1] * len(in_domain) + [0] * len(ood), scores))


@dataclass
class ContinualConfig:
    domains: tuple[str, str, str]
    workdir: Path
    mount: dict[str, Any] = field(default_factory=dict)  # MountConfig fields
    eval_chunks: int = 32

    @property
    def names(self) -> list[str]:
        """Expert names: a built-in source's name, else the directory's name."""
        from cir.router.registry import NAME_RE

        return [d if NAME_RE.fullmatch(d) else Path(d).name for d in self.domains]


def _measure(reg: Registry, names: list[str], cfg: ContinualConfig) -> dict[str, Any]:
    experts = reg.load(names).experts
    out = {}
    for name in names:
        ids, mask = held_out_test(reg.data_dir(name), cfg.eval_chunks)
        route = route_chunks(experts, ids, mask)
        out[name] = {"routing_accuracy": routing_accuracy(route, name),
                     **lm_comparison(experts, ids, mask, route)}
    return out


def _sequential_stage(reg: Registry, cfg: ContinualConfig, k: int, prev: Path | None) -> Path:
    """Fine-tune one LM on domain ``k`` starting from the previous stage's weights."""
    from cir.data import open_dataset
    from cir.experts.registry import build_model
    from cir.experts.train import lm_loss

    from cir.checkpoint import load_checkpoint
    from cir.train import TrainConfig, train

    mcfg = MountConfig(**cfg.mount)
    data = open_dataset(reg.data_dir(cfg.names[k]), "train")
    if prev is None:
        torch.manual_seed(mcfg.seed)
        model = build_model(mcfg.lm_arch, LM_PRESET[mcfg.preset], vocab_size=data.vocab_size,
                            seq_len=data.seq_len, **mcfg.lm_overrides)
    else:
        model = load_checkpoint(prev, expect="language model")
    settings = {**LM_TRAIN[mcfg.preset], "device": mcfg.device, "seed": mcfg.seed + k,
                **mcfg.lm_train}
    if mcfg.steps_lm:
        settings["steps"] = mcfg.steps_lm
    out = cfg.workdir / "sequential" / f"stage{k}-{cfg.names[k]}"
    train(model, lm_loss, data, out, TrainConfig(**settings), tokenizer=reg.tokenizer_path)
    return out


def _sequential_ppl(reg: Registry, ckpt: Path, names: list[str], cfg: ContinualConfig) -> dict[str, float]:
    from cir.experts.evaluate import perplexity

    from cir.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt, expect="language model")
    out = {}
    for name in names:
        ids, mask = held_out_test(reg.data_dir(name), cfg.eval_chunks)
        r = perplexity(model, ids, mask)
        out[name] = _ppl(r["nll_sum"], r["n_tokens"])
    return out


def run_continual(cfg: ContinualConfig, on_event: Event | None = None) -> dict[str, Any]:
    """Mount A, B; measure; mount C; measure; and the sequential fine-tuning baseline."""
    from cir.router.quickstart import ensure_tokenizer

    emit = on_event or (lambda e: None)
    t0 = time.perf_counter()
    names = cfg.names
    reg = Registry(cfg.workdir / "registry")
    ensure_tokenizer(reg, list(cfg.domains))
    measured = {}
    for stage in (2, 3):
        for name, source in zip(names[:stage], cfg.domains[:stage], strict=True):
            if name not in reg:
                mount(reg, name, source, MountConfig(**cfg.mount), on_event=emit)
        emit({"stage": "measure", "name": "+".join(names[:stage])})
        measured[stage] = _measure(reg, names[:stage], cfg)
    sequential, prev = [], None
    for k in range(3):
        emit({"stage": "sequential", "name": names[k]})
        prev = _sequential_stage(reg, cfg, k, prev)
        sequential.append({"after": names[k], "ppl": _sequential_ppl(reg, prev, names[: k + 1], cfg)})
    return {"domains": names, "before": measured[2], "after": measured[3],
            "sequential": sequential, "wall_s": time.perf_counter() - t0,
            "registry": str(reg.root)}
