"""Routing by reconstruction error, with no gating network (Compression is Routing, seed 001).

Every mounted compressor reconstructs every chunk. Per chunk:

- ``loss[i, e]`` / ``tra[i, e]``: reconstruction cross-entropy and token reconstruction
  accuracy of expert ``e`` on chunk ``i``;
- the route is the expert with the lowest loss; soft weights are ``softmax(-loss / T)``
  (for mixtures of experts, e.g. weighting the experts' LMs);
- the chunk is **unknown** (out of every mounted domain) when the routed expert's TRA is
  below that expert's calibrated threshold, or its loss above its calibrated loss ceiling.

Calibration rule (at mount, on held-out in-domain chunks, see :func:`calibrate`):
``threshold = max(0, quantile_q(held-out TRA) - margin)`` and
``loss_threshold = quantile_{1-q}(held-out loss) + loss_margin`` with ``q = 0.01``,
``margin = 0.02`` and ``loss_margin = 0.1`` nats by default, i.e. about 1% of in-domain
chunks (less the margins) are expected to be flagged. The TRA rule is the paper's signal
for a well-trained compressor; the loss ceiling still separates OOD text when a small,
briefly trained compressor reconstructs few tokens exactly (TRA near 0 everywhere). All
are configurable; the quantiles are stored in ``calibration.json`` so thresholds can be
re-derived without re-scoring.

Per file, :meth:`RouteResult.decision` gives the token-weighted majority route and the
loss-weighted route (lowest token-weighted mean loss), and :meth:`RouteResult.segments`
the contiguous runs of chunks with the same route, showing where a file switches domain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

UNKNOWN = "unknown"
DEFAULT_QUANTILE = 0.01
DEFAULT_MARGIN = 0.02
DEFAULT_LOSS_MARGIN = 0.1
REPORTED_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


class Scorer(Protocol):
    def score(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int | None = None) -> Any:
        """An object with ``loss [B]`` and ``tra [B]`` tensors."""


class Routable(Protocol):
    name: str
    threshold: float | None
    compressor: Scorer


@dataclass
class Segment:
    """Chunks ``start`` to ``end`` (exclusive) all routed to ``label``."""

    label: str
    start: int
    end: int
    n_tokens: int


@dataclass
class RouteResult:
    """Per-chunk routing of ``N`` chunks over ``E`` experts (tensors on CPU)."""

    names: list[str]
    loss: torch.Tensor  # [N, E]
    tra: torch.Tensor  # [N, E]
    n_tokens: torch.Tensor  # [N]
    thresholds: list[float | None]
    temperature: float = 1.0
    loss_thresholds: list[float | None] | None = None
    route: torch.Tensor = field(init=False)  # [N] index into names
    weights: torch.Tensor = field(init=False)  # [N, E], rows sum to 1
    unknown: torch.Tensor = field(init=False)  # [N] bool

    def __post_init__(self) -> None:
        loss = torch.nan_to_num(self.loss.double(), nan=float("inf"))  # [N, E]
        self.route = loss.argmin(-1) if loss.shape[1] else torch.zeros(0, dtype=torch.long)
        self.weights = torch.softmax(-loss / self.temperature, dim=-1).float()
        thr = torch.tensor([-1.0 if t is None else t for t in self.thresholds])  # [E]
        best_tra = self.tra.gather(1, self.route[:, None]).squeeze(1)  # [N]
        self.unknown = torch.nan_to_num(best_tra, nan=-1.0) < thr[self.route]
        ceilings = self.loss_thresholds or [None] * len(self.names)
        ceil = torch.tensor([float("inf") if c is None else c for c in ceilings])  # [E]
        best_loss = loss.gather(1, self.route[:, None]).squeeze(1)  # [N]
        self.unknown |= best_loss > ceil[self.route].double()

    def __len__(self) -> int:
        return self.loss.shape[0]

    @property
    def best_tra(self) -> torch.Tensor:
        return self.tra.gather(1, self.route[:, None]).squeeze(1)  # [N]

    def labels(self) -> list[str]:
        """The routed expert per chunk, or ``"unknown"``."""
        return [
            UNKNOWN if u else self.names[r]
            for r, u in zip(self.route.tolist(), self.unknown.tolist(), strict=True)
        ]

    def segments(self) -> list[Segment]:
        out: list[Segment] = []
        for i, (label, n) in enumerate(zip(self.labels(), self.n_tokens.tolist(), strict=True)):
            if out and out[-1].label == label:
                out[-1].end = i + 1
                out[-1].n_tokens += int(n)
            else:
                out.append(Segment(label, i, i + 1, int(n)))
        return out

    def expert_means(self) -> dict[str, dict[str, float]]:
        """Token-weighted mean loss and TRA of each expert over all chunks."""
        w = self.n_tokens.double()[:, None]  # [N, 1]
        total = max(float(w.sum()), 1.0)
        # an empty chunk (weight 0) drops out; a NaN score on real tokens (a diverged
        # compressor) stays NaN, as routing never picks it, instead of reading as loss 0
        real = w > 0  # [N, 1]
        loss = torch.where(real, self.loss.double(), 0.0).mul(w).sum(0) / total  # [E]
        tra = torch.where(real, self.tra.double(), 0.0).mul(w).sum(0) / total  # [E]
        return {n: {"loss": float(lo), "tra": float(t)} for n, lo, t in zip(self.names, loss, tra, strict=True)}

    def decision(self) -> dict[str, Any]:
        """File-level verdict: token-weighted majority and loss-weighted routes."""
        if len(self) == 0:
            return {"majority": None, "loss_weighted": None, "unknown_fraction": 0.0, "shares": {}}
        shares: dict[str, int] = {}
        for label, n in zip(self.labels(), self.n_tokens.tolist(), strict=True):
            shares[label] = shares.get(label, 0) + int(n)
        total = max(sum(shares.values()), 1)
        majority = max(shares, key=lambda k: (shares[k], k != UNKNOWN))
        means = self.expert_means()
        loss_weighted = min(means, key=lambda k: nan_last(means[k]["loss"]))
        return {
            "majority": majority,
            "loss_weighted": loss_weighted,
            "unknown_fraction": shares.get(UNKNOWN, 0) / total,
            "shares": {k: v / total for k, v in sorted(shares.items())},
        }

    def chunk_records(self) -> list[dict[str, Any]]:
        labels = self.labels()
        return [
            {
                "chunk": i,
                "n_tokens": int(self.n_tokens[i]),
                "route": labels[i],
                "loss": dict(zip(self.names, map(float, self.loss[i]), strict=True)),
                "tra": dict(zip(self.names, map(float, self.tra[i]), strict=True)),
                "weights": dict(zip(self.names, map(float, self.weights[i]), strict=True)),
            }
            for i in range(len(self))
        ]

    @staticmethod
    def cat(parts: list[RouteResult]) -> RouteResult:
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        return RouteResult(
            names=first.names,
            loss=torch.cat([p.loss for p in parts]),
            tra=torch.cat([p.tra for p in parts]),
            n_tokens=torch.cat([p.n_tokens for p in parts]),
            thresholds=first.thresholds,
            temperature=first.temperature,
            loss_thresholds=first.loss_thresholds,
        )


def nan_last(x: float) -> float:
    """A sort key that puts NaN (a diverged model's score) after every number."""
    return float("inf") if math.isnan(x) else x


def route_chunks(
    experts: list[Routable],
    ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> RouteResult:
    """Score ``ids, mask [N, T]`` with every expert's compressor and route each chunk."""
    if not experts:
        raise ValueError("no experts to route to: mount one first")
    check_temperature(temperature)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    losses, tras = [], []
    for expert in experts:
        s = expert.compressor.score(ids, mask, batch_size=batch_size)
        losses.append(s.loss.float().cpu())  # [N]
        tras.append(s.tra.float().cpu())  # [N]
    return RouteResult(
        names=[e.name for e in experts],
        loss=torch.stack(losses, dim=1),  # [N, E]
        tra=torch.stack(tras, dim=1),  # [N, E]
        n_tokens=mask.sum(1).cpu(),
        thresholds=[e.threshold for e in experts],
        temperature=temperature,
        loss_thresholds=[getattr(e, "loss_threshold", None) for e in experts],
    )


def check_temperature(temperature: float) -> None:
    """``ValueError`` unless ``temperature`` is a finite number > 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")


def by_chunk_length(named: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    """``{chunk length: [names]}`` of ``(name, chunk length)`` pairs."""
    out: dict[int, list[str]] = {}
    for name, n in named:
        out.setdefault(int(n), []).append(name)
    return out


def chunk_length_groups(by_len: dict[int, list[str]]) -> str:
    """``"a, b: 512; c: 32"``: who uses which chunk length."""
    return "; ".join(f"{', '.join(names)}: {n}" for n, names in sorted(by_len.items()))


def seq_len_of(experts: list[Routable]) -> int:
    """The chunk length every compressor of a registry was built for; when they disagree,
    a ``ValueError`` naming the experts off the most common length."""
    if not experts:
        raise ValueError("no experts to take a chunk length from")
    by_len = by_chunk_length((e.name, e.compressor.config.seq_len) for e in experts)
    if len(by_len) != 1:
        sizes = sorted((len(names) for names in by_len.values()), reverse=True)
        common = max(by_len, key=lambda n: len(by_len[n])) if sizes[0] > sizes[1] else None
        odd = sorted(name for n, names in by_len.items() if n != common for name in names)
        raise ValueError(
            f"experts disagree on the chunk length (tokens: {chunk_length_groups(by_len)}); "
            f"unmount the odd one(s) ({', '.join(odd)}) and mount them again with the others' "
            "preset"
        )
    return by_len.popitem()[0]


def calibrate(
    compressor: Scorer,
    ids: torch.Tensor,
    mask: torch.Tensor,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    batch_size: int | None = None,
    loss_margin: float = DEFAULT_LOSS_MARGIN,
) -> dict[str, Any]:
    """The OOD thresholds of a compressor from held-out in-domain chunks ``[N, T]``.

    ``threshold = max(0, quantile_q(TRA) - margin)``,
    ``loss_threshold = quantile_{1-q}(loss) + loss_margin``; the quantiles are kept."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    if ids.shape[0] == 0:
        raise ValueError("calibration needs at least one held-out chunk")
    s = compressor.score(ids, mask, batch_size=batch_size)
    tra, loss = s.tra.double(), s.loss.double()
    qs = torch.tensor(REPORTED_QUANTILES, dtype=torch.float64)
    q_tra = float(torch.quantile(tra, quantile))
    return {
        "rule": "unknown if TRA < max(0, quantile(held-out TRA, q) - margin) or "
                "loss > quantile(held-out loss, 1 - q) + loss_margin",
        "quantile": quantile,
        "margin": margin,
        "loss_margin": loss_margin,
        "threshold": max(0.0, q_tra - margin),
        "loss_threshold": float(torch.quantile(loss, 1.0 - quantile)) + loss_margin,
        "n_chunks": int(ids.shape[0]),
        "n_tokens": int(mask.sum()),
        "tra_mean": float(tra.mean()),
        "loss_mean": float(loss.mean()),
        "tra_quantiles": {str(q): float(v) for q, v in zip(qs.tolist(), torch.quantile(tra, qs), strict=True)},
        "loss_quantiles": {
            str(q): float(v) for q, v in zip(qs.tolist(), torch.quantile(loss, qs), strict=True)
        },
    }


def routing_accuracy(result: RouteResult, expected: str) -> float:
    """Share of chunks routed to ``expected`` (unknown counts as wrong)."""
    labels = result.labels()
    return sum(label == expected for label in labels) / max(len(labels), 1)


def ood_auroc(in_domain: RouteResult, ood: RouteResult) -> float:
    """AUROC of the routed expert's TRA separating in-domain (high) from OOD chunks."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_domain.best_tra, ood.best_tra]).nan_to_num(0.0).numpy()
    labels = [1] * len(in_domain) + [0] * len(ood)
    return float(roc_auc_score(labels, scores))
