"""The Transformer autoencoder of "Compression is Routing" (seed 001): 512 tokens -> 8 latents.

Paper: Z. Tang, "Compression is Routing: Reconstruction Error as an Intrinsic Signal for
Modular Language Models". An 87M-parameter autoencoder compresses a 512-token chunk into 8
latent vectors; how well it reconstructs a chunk (TRA, token reconstruction accuracy, or the
cross-entropy of the reconstruction) tells whether the chunk is from its training domain.

- Encoder: ``n_latents`` learned latent queries are prepended to the token embeddings (the
  tokens get learned absolute positions); bidirectional pre-LN layers with a key padding
  mask; the outputs at the query positions, after a final LayerNorm, are the latents
  ``z [B, L, D]``.
- Decoder: input ``[z ; m]`` where ``m`` is ``seq_len`` learned, content-free position
  queries; bidirectional pre-LN layers; LayerNorm; LM head tied to the token embedding.
  The decoder never sees the input tokens: everything it knows about them is in ``z``.

Choices where the paper is silent (ours): GELU MLP, no biases in linear layers, LayerNorm
everywhere, the decoder always runs all ``seq_len`` position queries (so a short chunk is
decoded exactly like a padded full-length one and its tail is ignored), and the ``paper``
preset uses its own 32768-token BPE vocabulary (the paper used GPT-2's 50257): with
d_model 512 and 11 + 11 layers that gives 86.5M parameters, inside the paper's 87M +- 2M.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cir.checkpoint import check_field_types, config_from_dict, config_to_dict


@dataclass
class CompressorConfig:
    vocab_size: int
    seq_len: int = 512
    n_latents: int = 8
    d_model: int = 512
    n_heads: int = 8
    n_enc_layers: int = 11
    n_dec_layers: int = 11
    d_ff: int = 2048
    dropout: float = 0.0
    norm_eps: float = 1e-5
    # 0: the decoder reads the encoder's latents (the paper's). N > 0: a discrete
    # bottleneck of log2(N) bits: a chunk is encoded as one of N learned codes, each a
    # latent set and an output shift, and the decoder reads that code: the code that
    # reconstructs the chunk best (Compressor.best_codes), or from latents alone the
    # encoder's pick (Compressor.reconstruct)
    n_codes: int = 0
    # how soft a chunk's training share between codes is, in nats per token (_code_loss)
    code_temperature: float = 0.01
    # True: training splits each batch evenly between the codes (balanced_shares). False:
    # each chunk trains the codes by how well they reconstruct it alone, hard EM as the
    # temperature goes to 0; the codes start apart instead, each at one training chunk's
    # unigram (Compressor.init_code_bias)
    code_balance: bool = True

    presets: ClassVar[dict[str, dict[str, Any]]]

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size > 2, f"vocab_size must be > 2 (PAD and EOS), got {self.vocab_size}"),
            (self.seq_len > 0, f"seq_len must be > 0, got {self.seq_len}"),
            (self.n_latents > 0, f"n_latents must be > 0, got {self.n_latents}"),
            (self.n_heads > 0, f"n_heads must be > 0, got {self.n_heads}"),
            (
                self.d_model > 0 and self.d_model % max(self.n_heads, 1) == 0,
                f"d_model ({self.d_model}) must be a positive multiple of n_heads "
                f"({self.n_heads}); change one of them",
            ),
            (
                self.n_enc_layers > 0 and self.n_dec_layers > 0,
                "n_enc_layers and n_dec_layers must be > 0",
            ),
            (self.d_ff > 0, f"d_ff must be > 0, got {self.d_ff}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (self.n_codes >= 0 and self.n_codes != 1,
             f"n_codes must be 0 (continuous latents) or >= 2, got {self.n_codes}"),
            (self.code_temperature > 0,
             f"code_temperature must be > 0, got {self.code_temperature}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"CompressorConfig: {msg}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CompressorConfig:
        """A preset by name, with field overrides (e.g. ``vocab_size`` from a tokenizer)."""
        if name not in cls.presets:
            raise ValueError(
                f"unknown compressor preset {name!r}; valid: {', '.join(cls.presets)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"CompressorConfig has no fields {unknown}; valid: {', '.join(sorted(fields))}"
            )
        check_field_types(cls, overrides)
        return cls(**{**cls.presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressorConfig:
        """Strict: unknown or missing fields are an error naming them; the fields added
        later (``n_codes``, ``code_temperature``, ``code_balance``) take their defaults in
        a config saved before them."""
        if isinstance(data, dict):
            later = {f.name: f.default for f in dataclasses.fields(cls)
                     if f.name in ("n_codes", "code_temperature", "code_balance")}
            data = {**later, **data}
        return config_from_dict(cls, data)


CompressorConfig.presets = {
    # tests: a forward pass in milliseconds on CPU
    "debug": dict(vocab_size=512, seq_len=32, n_latents=4, d_model=32, n_heads=2,
                  n_enc_layers=1, n_dec_layers=1, d_ff=64),
    # a useful router trained in minutes on a couple of CPU cores: 8 codes with free
    # shares, refitted after training (docs/results/cpu-compressor.md, "The small
    # preset"); n_codes=0 gives the same network with continuous latents
    "small": dict(vocab_size=8192, seq_len=512, n_latents=8, d_model=64, n_heads=2,
                  n_enc_layers=2, n_dec_layers=2, d_ff=256, n_codes=8, code_balance=False),
    "base": dict(vocab_size=32768, seq_len=512, n_latents=8, d_model=384, n_heads=6,
                 n_enc_layers=6, n_dec_layers=6, d_ff=1536),
    # the seed's 87M, 512 -> 8 (86.5M with a 32768-token vocabulary)
    "paper": dict(vocab_size=32768, seq_len=512, n_latents=8, d_model=512, n_heads=8,
                  n_enc_layers=11, n_dec_layers=11, d_ff=2048),
}


@dataclass
class ChunkScores:
    """Per-chunk reconstruction scores; every field is ``[B]`` (latents ``[B, L, D]``).

    ``loss`` is the mean cross-entropy over the chunk's real tokens (NaN for a chunk
    without any), ``tra`` the share of real tokens reconstructed exactly (argmax)."""

    loss: torch.Tensor
    tra: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor
    latents: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[ChunkScores]) -> ChunkScores:
        latents = [p.latents for p in parts]
        return ChunkScores(
            loss=torch.cat([p.loss for p in parts]),
            tra=torch.cat([p.tra for p in parts]),
            n_tokens=torch.cat([p.n_tokens for p in parts]),
            n_correct=torch.cat([p.n_correct for p in parts]),
            latents=None if any(x is None for x in latents) else torch.cat(latents),
        )


def sinusoids(n: int, d: int) -> torch.Tensor:
    """``[n, d]`` Transformer position table: sin / cos pairs at geometric frequencies
    from 1 to 1/10000 (the last unpaired column of an odd ``d`` is a sine)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # [n, 1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [ceil(d/2)]
    angle = pos * freq  # [n, ceil(d/2)]
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d // 2])
    return table.float()


class Block(nn.Module):
    """Pre-LN bidirectional Transformer layer: attention (optional key mask) + GELU MLP."""

    def __init__(self, cfg: CompressorConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, S, D)))  # [B, S, D]
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class Compressor(nn.Module):
    """Transformer autoencoder: ``encode(ids, mask) -> z``, ``decode(z) -> logits``."""

    kind = "compressor"
    config_class = CompressorConfig

    def __init__(self, config: CompressorConfig, position_init: str = "sinusoid") -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.enc_pos = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.latent_queries = nn.Parameter(torch.zeros(cfg.n_latents, d))
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_enc_layers))
        self.enc_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.pos_queries = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.decoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_dec_layers))
        self.dec_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.n_codes:
            self.code_head = nn.Linear(cfg.n_latents * d, cfg.n_codes, bias=False)
            self.codebook = nn.Parameter(torch.zeros(cfg.n_codes, cfg.n_latents, d))
            # each code's own shift of the output distribution (starts at zero)
            self.code_bias = nn.Parameter(torch.zeros(cfg.n_codes, cfg.vocab_size))
        self.reset_parameters(position_init)

    def reset_parameters(self, position_init: str = "sinusoid") -> None:
        """Fan-in scaled: every linear weight N(0, 1/fan_in), the token embedding (also
        the LM head) N(0, 1/d_model), latent queries N(0, 0.02). ``position_init``:
        ``sinusoid`` starts both position tables as sinusoids (then learned), the encoder's
        at the token embeddings' scale (rows of norm 1), the decoder's position queries at
        the latents' scale (rows of norm sqrt(d_model / 2), next to LayerNorm outputs of
        norm sqrt(d_model)); ``normal`` draws them from N(0, 0.02).

        Not GPT-2's N(0, 0.02) everywhere: information reaches a reconstruction only
        through two attention hops (tokens -> latents -> positions), each a product of
        small matrices under that init, and the model sits for thousands of steps on the
        position-wise unigram plateau with latents it ignores. Small random position
        queries also leave the decoder's positions almost alike beside the latents;
        sinusoids make them distinct from step 0, which takes a model that goes on to
        reconstruct off the plateau sooner, and slows one that stays a bag of tokens
        (measured both ways in docs/architecture.md)."""
        if position_init not in ("sinusoid", "normal"):
            raise ValueError(f"position_init must be sinusoid or normal, got {position_init!r}")
        d = self.config.d_model
        sinusoidal = ("enc_pos", "pos_queries") if position_init == "sinusoid" else ()
        stds = {"tok_emb.weight": d**-0.5, "latent_queries": 0.02, "enc_pos": 0.02,
                "pos_queries": 0.02, "codebook": 1.0}  # codes at the scale of enc_norm's z
        for name, p in self.named_parameters():
            if p.dim() < 2 or name in sinusoidal:
                continue  # LayerNorm weights/biases keep their defaults
            nn.init.normal_(p, mean=0.0, std=stds.get(name, p.shape[1] ** -0.5))
        if sinusoidal:
            with torch.no_grad():
                table = sinusoids(self.config.seq_len, d)  # [S, D], rows of norm sqrt(D / 2)
                self.enc_pos.copy_(table * (2.0 / d) ** 0.5)
                self.pos_queries.copy_(table)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [B, T]`` (T <= seq_len) -> latents ``z [B, L, D]``."""
        B, T = ids.shape
        L = self.config.n_latents
        if T > self.config.seq_len:
            raise ValueError(f"chunk length {T} exceeds the compressor's seq_len "
                             f"{self.config.seq_len}")
        tok = self.tok_emb(ids) + self.enc_pos[:T]  # [B, T, D]
        x = torch.cat([self.latent_queries.expand(B, L, -1), tok], dim=1)  # [B, L+T, D]
        x = self.drop(x)
        key_mask = torch.cat([mask.new_ones(B, L), mask.bool()], dim=1)  # [B, L+T]
        for block in self.encoder:
            x = block(x, key_mask)
        return self.enc_norm(x[:, :L])  # [B, L, D]

    def code_choice(self, z: torch.Tensor) -> torch.Tensor:
        """Log-weights ``[B, C]`` (fp32) the encoder gives each code for latents ``z``."""
        return F.log_softmax(self.code_head(z.flatten(1)).float(), dim=-1)

    def reconstruct(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, seq_len or P, V]`` of the reconstruction from latents ``z``: the
        decoder reads ``z`` itself, or with ``n_codes`` the code the encoder weighs highest
        (its latent set, plus its output shift). A chunk then reconstructs only as one of
        ``n_codes`` prototypes of the training domain, so an input unlike that domain
        cannot steer the decoder towards itself (docs/results/cpu-compressor.md). Given the
        tokens, ``forward`` and ``score`` search the codes instead (``best_codes``)."""
        if not self.config.n_codes:
            return self.decode(z, positions)
        pick = self.code_choice(z).argmax(-1)  # [B]
        logits = self.decode(self.codebook[pick].to(z.dtype), positions)
        return logits + self.code_bias[pick][:, None, :].to(logits.dtype)

    @torch.no_grad()
    def best_codes(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` the code under which each chunk of ``ids, mask [B, T]`` has the lowest
        reconstruction loss (the first on ties): a coded compressor's exact encoding,
        since its ``n_codes`` reconstructions do not depend on the input. The encoder's
        pick (``code_choice``) is its learned guess of the same."""
        if not self.config.n_codes:
            raise ValueError("best_codes() needs a compressor with n_codes")
        return _best_codes(self.code_logits()[:, : ids.shape[1]], ids, mask)

    @torch.no_grad()
    def init_code_bias(self, token_counts: torch.Tensor) -> None:
        """Start each code's output shift at the log add-one unigram of its row of
        ``token_counts [n_codes, V]`` (one training chunk's counts: codes that start apart
        part without balanced shares, as hard EM's clusters do)."""
        if not self.config.n_codes:
            raise ValueError("init_code_bias() needs a compressor with n_codes")
        if tuple(token_counts.shape) != tuple(self.code_bias.shape):
            raise ValueError(f"token counts of shape {tuple(token_counts.shape)}; the codes "
                             f"need {tuple(self.code_bias.shape)}")
        counts = token_counts.double() + 1.0
        self.code_bias.copy_((counts / counts.sum(-1, keepdim=True)).log())

    @torch.no_grad()
    def refit_codes(self, ids: torch.Tensor, mask: torch.Tensor, iters: int = 50,
                    tol: float = 1e-3, smoothing: float = 1.0) -> dict[str, Any]:
        """Refit each code's output shift to the chunks its encoder picks among ``ids, mask
        [N, T]``: the shift that maximises their likelihood under the code, ``smoothing``
        added to every token's count (add-one by default; the M-step of hard EM, with the
        encoder's picks as the E-step). The decoder's share of each code's logits and the picks are unchanged.

        Solved by iterative scaling: the shift moves by log(observed / expected counts),
        which is exact in one round for logits that do not depend on the position, until
        no token's expected count is more than ``tol`` (relative) off. Training learns the
        shifts by gradient steps of at most about the learning rate each, too few to reach
        the rare tokens' log-probabilities in a short run (docs/results/cpu-compressor.md).
        Returns the chunks each code took and the rounds run."""
        C, V = self.config.n_codes, self.config.vocab_size
        if not C:
            raise ValueError("refit_codes() needs a compressor with n_codes")
        if not smoothing > 0:
            raise ValueError(f"smoothing must be > 0, got {smoothing}")
        was_training = self.training
        self.eval()
        device = self.code_bias.device
        mask = mask.bool()
        keep = mask.any(1)
        ids, mask = ids[keep], mask[keep]
        T = ids.shape[1]
        picks = torch.cat([
            self.code_choice(self.encode(ids[s : s + 256].to(device),
                                         mask[s : s + 256].to(device))).argmax(-1).cpu()
            for s in range(0, len(ids), 256)
        ]) if len(ids) else torch.zeros(0, dtype=torch.long)
        base = self.decode(self.codebook)[:, :T].float()  # [C, T, V], without the shifts
        rounds = []
        for c in range(C):
            mine = picks == c
            if not mine.any():  # a code no chunk picks keeps its shift
                rounds.append(0)
                continue
            tok_ids, tok_mask = ids[mine], mask[mine]
            counts = torch.bincount(tok_ids[tok_mask], minlength=V).double().to(device) + smoothing
            per_position = tok_mask.sum(0).double().to(device)  # [T] chunks with a token there
            target = counts * (per_position.sum() / counts.sum())  # [V], add-one, rescaled
            shift = self.code_bias[c].double()
            rounds.append(0)
            while rounds[-1] < iters:
                rounds[-1] += 1
                probs = torch.softmax(base[c].double() + shift, dim=-1)  # [T, V]
                ratio = target / (per_position @ probs)  # observed / expected counts, [V]
                shift = shift + ratio.log()
                if (ratio - 1.0).abs().max() <= tol:
                    break
            self.code_bias[c].copy_(shift - shift.logsumexp(0))
        self.train(was_training)
        return {"chunks": len(ids), "code_use": torch.bincount(picks, minlength=C).tolist(),
                "rounds": rounds}

    def code_logits(self, positions: torch.Tensor | None = None,
                    codes: slice = slice(None)) -> torch.Tensor:
        """Logits ``[C, seq_len or P, V]`` of the ``codes``' reconstructions (every code by
        default: its latent set, plus its output shift). They do not depend on the input:
        one decoder pass over the codes serves any number of chunks."""
        per_code = self.decode(self.codebook[codes], positions)
        return per_code + self.code_bias[codes, None, :].to(per_code.dtype)

    def decode(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Latents ``z [B, L, D]`` -> logits ``[B, seq_len, V]``; sees nothing but z.

        ``positions [P]`` restricts the LM head to those positions (``[B, P, V]``); the
        decoder layers still run every position query, so the logits there are unchanged."""
        B, L, _ = z.shape
        m = self.pos_queries.expand(B, -1, -1)  # [B, S, D]
        x = self.drop(torch.cat([z, m], dim=1))  # [B, L+S, D]
        for block in self.decoder:
            x = block(x)
        h = x[:, L:] if positions is None else x[:, L + positions]  # [B, S or P, D]
        return self.dec_norm(h) @ self.tok_emb.weight.T  # [B, S or P, V], tied head

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor | CodeLogits:
        """Reconstruction logits ``[B, T, V]`` for ``ids, mask [B, T]`` (``[B, P, V]`` at
        ``positions [P]`` when given: cheaper training, the head being the largest matmul).

        With ``n_codes``, in training: ``CodeLogits``, every code's reconstruction and the
        encoder's weights over them, for ``loss_fn``'s code loss; in eval, the
        reconstruction of the code that reconstructs each chunk best (``best_codes``)."""
        T = ids.shape[1]
        if self.config.n_codes and self.training:
            per_code = self.code_logits(positions)  # [C, S or P, V]
            return CodeLogits(per_code if positions is not None else per_code[:, :T],
                              self.code_choice(self.encode(ids, mask)),
                              self.config.code_temperature, self.config.code_balance)
        if self.config.n_codes:  # eval: the code that reconstructs the chunk best, found
            per_code = self.code_logits()  # on every position; the encoder does not run
            pick = _best_codes(per_code[:, :T], ids, mask)
            return per_code[pick][:, positions] if positions is not None else per_code[pick, :T]
        z = self.encode(ids, mask)
        if positions is not None:
            return self.reconstruct(z, positions)
        return self.reconstruct(z)[:, :T]

    def default_score_batch(self) -> int:
        """Chunks per scoring pass so that one pass's fp32 logits stay near 512 MiB on a
        GPU and 64 MiB on a CPU (where larger passes are no faster, only heavier); a coded
        model holds each chunk's losses under its codes instead (``n_codes`` per token)."""
        per_chunk = 4 * self.config.seq_len * (self.config.n_codes or self.config.vocab_size)
        budget = (512 if next(self.parameters()).is_cuda else 64) << 20
        return max(1, min(256, budget // per_chunk))

    @torch.inference_mode()
    def score(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        batch_size: int | None = None,
        return_latents: bool = False,
        precision: str = "auto",
        codes: str = "best",
    ) -> ChunkScores:
        """Per-chunk reconstruction loss and TRA for ``ids, mask [B, T]``, batched.

        ``precision``: auto (bf16 autocast on CUDA, as the trainer runs there; fp32
        elsewhere) | fp32 | bf16. Losses are always taken on fp32 logits. ``codes`` (with
        ``n_codes``): ``best`` scores each chunk under the code that reconstructs it best
        (``best_codes``; the encoder runs only for ``return_latents``), ``encoder`` under
        the code the encoder names."""
        from cir.train import autocast_for

        if codes not in ("best", "encoder"):
            raise ValueError(f"codes must be best or encoder, got {codes!r}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        bs = batch_size or self.default_score_batch()
        tables = None
        if self._use_code_tables(ids.shape[1]):
            with autocast_for(device, precision):
                tables = self._code_tables(ids.shape[1])
        parts = []
        for start in range(0, ids.shape[0], bs):
            sl = slice(start, start + bs)
            with autocast_for(device, precision):
                parts.append(self._score_batch(ids[sl].to(device), mask[sl].to(device),
                                               return_latents, tables, codes))
        self.train(was_training)
        if not parts:
            empty = torch.zeros(0)
            return ChunkScores(empty, empty, empty.long(), empty.long(), None)
        return ChunkScores.cat(parts)

    # the most memory the per-code tables of one ``score`` call may take
    CODE_TABLE_BYTES: ClassVar[int] = 1 << 30

    def _use_code_tables(self, T: int) -> bool:
        """Whether ``score`` should decode every code once for the whole call (with
        ``n_codes``, tables within budget) rather than once per batch, one code at a time."""
        C = self.config.n_codes
        table_bytes = 4 * C * T * self.config.vocab_size  # the fp32 log-probabilities
        return bool(C) and table_bytes <= self.CODE_TABLE_BYTES

    def _code_tables(self, T: int, codes: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``codes``' reconstructions over the first ``T`` positions, as scoring needs
        them: log-probabilities ``[C, T, V]`` (fp32) and the first most likely token
        ``[C, T]``."""
        logits = self.code_logits(codes=codes)[:, :T].float()  # [C, T, V]
        return F.log_softmax(logits, dim=-1), logits.max(-1).indices

    def _score_batch(self, ids: torch.Tensor, mask: torch.Tensor, latents: bool,
                     tables: tuple[torch.Tensor, torch.Tensor] | None = None,
                     codes: str = "best") -> ChunkScores:
        mask = mask.bool()
        T = ids.shape[1]
        need_z = latents or not self.config.n_codes or codes == "encoder"
        z = self.encode(ids, mask) if need_z else None  # [B, L, D]
        if self.config.n_codes:  # C reconstructions fixed by the model: look them up
            if tables is None:  # over the table budget: one code at a time
                parts = [self._code_tables(T, slice(c, c + 1)) for c in range(self.config.n_codes)]
                ce_all = torch.cat([_code_ce(lp, ids, mask) for lp, _ in parts])  # [C, B, T]
                top = torch.cat([t for _, t in parts])  # [C, T]
            else:
                ce_all, top = _code_ce(tables[0], ids, mask), tables[1]
            if codes == "best":
                pick = ce_all.sum(-1).argmin(0)  # [B]
            else:
                pick = self.code_choice(z).argmax(-1)
            ce = ce_all[pick, torch.arange(len(ids), device=ids.device)]  # [B, T]
            correct = (top[pick] == ids) & mask  # [B, T]
        else:
            logits = self.reconstruct(z)[:, :T].float()  # [B, T, V]
            # flat rows: the [B, V, T] layout of a transposed call is several times slower
            # on CPU
            ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(),
                                 reduction="none").view_as(ids)
            # the first maximum, as argmax, which is slower on CPU than max over the same dim
            correct = (logits.max(-1).indices == ids) & mask  # [B, T]
        n_tokens = mask.sum(1)  # [B]
        n_correct = correct.sum(1)  # [B]
        denom = n_tokens.float()  # 0 for an empty chunk -> NaN scores on purpose
        return ChunkScores(
            loss=(ce * mask).sum(1).cpu() / denom.cpu(),
            tra=n_correct.float().cpu() / denom.cpu(),
            n_tokens=n_tokens.cpu(),
            n_correct=n_correct.cpu(),
            latents=z.float().cpu() if latents else None,
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _forward_flops_per_token(self, loss_fraction: float = 1.0) -> tuple[float, float]:
        """Forward FLOPs per input token (2 per multiply-add) of the encoder, and of the
        decoder with the LM head over ``loss_fraction`` of the positions. The layers run
        over ``seq_len + n_latents`` positions: matmuls, QK^T and AV."""
        c = self.config
        d, S = c.d_model, c.seq_len + c.n_latents
        per_position = 4 * d * d + 2 * d * c.d_ff + 2 * S * d  # one layer
        encoder = c.n_enc_layers * per_position * S / c.seq_len
        decoder = c.n_dec_layers * per_position * S / c.seq_len + d * c.vocab_size * loss_fraction
        return 2.0 * encoder, 2.0 * decoder

    def flops_per_token(self, loss_fraction: float = 1.0, batch_size: int | None = None) -> float:
        """Training FLOPs per input token (6N for the matmuls, attention and the head).

        The layers run over ``seq_len + n_latents`` positions, the LM head over the
        ``loss_fraction`` of the ``seq_len`` positions the loss is taken on
        (``sampled_loss_fn``). With ``n_codes`` and ``batch_size`` B, the decoder and the
        head run once per code, not per chunk: their share is scaled by ``n_codes / B``."""
        encoder, decoder = self._forward_flops_per_token(loss_fraction)
        if self.config.n_codes and batch_size:
            decoder *= self.config.n_codes / batch_size
        return 3.0 * (encoder + decoder)  # forward + backward

    def encoder_flops(self) -> float:
        """Forward FLOPs to encode one full chunk into its latents (matmuls and attention,
        as ``flops_per_token``): what a router that reads only latents pays per chunk."""
        return self._forward_flops_per_token()[0] * self.config.seq_len

    def scoring_flops(self) -> float:
        """Forward FLOPs to score one full chunk (matmuls and attention, as
        ``flops_per_token``). With ``n_codes``, one addition per code and position: the
        codes' reconstructions are decoded once per ``score`` call and only looked up, and
        the encoder does not run."""
        c = self.config
        encoder, decoder = self._forward_flops_per_token()
        if not c.n_codes:
            return (encoder + decoder) * c.seq_len
        return float(c.n_codes * c.seq_len)


class CodeLogits(NamedTuple):
    """A discrete-bottleneck compressor's training output (``n_codes`` codes)."""

    per_code: torch.Tensor  # [C, T, V] logits of each code's reconstruction
    choice: torch.Tensor  # [B, C] the encoder's log-weights over the codes (fp32)
    temperature: float  # nats per token: how soft a chunk's share between codes is
    balanced: bool = True  # shares split each batch evenly between the codes


def loss_fn(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction cross-entropy over real tokens (for ``cir.train.train``), plus TRA."""
    return _reconstruction_loss(model(ids, mask), ids, mask.bool())


def _code_ce(logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[C, B, T]`` cross-entropy of every token of ``ids, mask [B, T]`` under each of the
    codes' log-probabilities ``logp [C, T', V]`` (T' >= T), zero at padding."""
    T = ids.shape[1]
    ce = -logp[:, torch.arange(T, device=ids.device)[None, :], ids]  # [C, B, T]
    return ce * mask


@torch.no_grad()
def _best_codes(per_code: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` the code of ``per_code [C, T, V]`` logits under which each chunk of ``ids,
    mask [B, T]`` has the lowest summed cross-entropy (the first on ties)."""
    logp = F.log_softmax(per_code.float(), dim=-1)
    return _code_ce(logp, ids, mask.bool()).sum(-1).argmin(0)


def _reconstruction_loss(
    logits: torch.Tensor | CodeLogits, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(logits, CodeLogits):
        return _code_loss(logits, ids, mask)
    logits = logits.float()  # [B, T, V]
    target = ids.masked_fill(~mask, -100)  # [B, T]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    with torch.no_grad():
        tra = ((logits.argmax(-1) == ids) & mask).sum() / mask.sum()  # no dynamic shapes
    return loss, {"tra": tra, "n_targets": mask.sum()}


def balanced_shares(scores: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Soft assignments ``[B, C]`` of ``B`` chunks to ``C`` codes from ``scores`` (log
    weights), rows summing to one and each code taking an equal part of the batch
    (Sinkhorn-Knopp iterations, as in SwAV): codes that still reconstruct alike get
    different chunks, so they part instead of one code taking every chunk."""
    q = torch.exp(scores - scores.max())  # [B, C]
    B, C = q.shape
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True).clamp(min=1e-30) * (B / C)
        q = q / q.sum(1, keepdim=True).clamp(min=1e-30)
    return q


def _code_loss(
    out: CodeLogits, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training of a discrete bottleneck: balanced soft clustering of chunks by how well
    each code reconstructs them, and an encoder that learns to name the best code.

    Per chunk, ``CE [B, C]`` is its mean per-token cross-entropy under every code. Shares
    ``r = balanced_shares(-CE / temperature)`` (no gradient) split the batch evenly
    between the codes, so codes that still reconstruct alike get different chunks and
    part, where free shares would hand every chunk to whichever code learned the unigram
    first; each code learns its share (``sum_c r_c CE_c``, token-weighted over chunks).
    The encoder learns to pick ``argmin_c CE`` (cross-entropy on its log-weights), the
    code scoring searches for (``best_codes``). The returned value (and TRA) is the
    encoder's picked code's reconstruction, ``score(codes="encoder")``'s figure; its
    gradient is the objective's."""
    logp = F.log_softmax(out.per_code.float(), dim=-1)  # [C, T, V]
    n_chunk = mask.sum(-1)  # [B]
    ce = _code_ce(logp, ids, mask).sum(-1).T / n_chunk.clamp(min=1)[:, None]  # [B, C]
    fit = -ce.detach() / out.temperature  # [B, C]
    share = balanced_shares(fit) if out.balanced else torch.softmax(fit, dim=-1)
    weight = n_chunk / n_chunk.sum().clamp(min=1)  # token-weighted over chunks
    recon = ((share * ce).sum(-1) * weight).sum()
    choice = F.nll_loss(out.choice, ce.detach().argmin(-1))  # pick the best code
    with torch.no_grad():
        pick = out.choice.argmax(-1)  # [B]
        picked_ce = (ce.gather(1, pick[:, None])[:, 0] * weight).sum()
        picked = out.per_code.argmax(-1)[pick]  # [B, T]
        tra = ((picked == ids) & mask).sum() / mask.sum()
    objective = recon + choice
    return objective - objective.detach() + picked_ce, {"tra": tra, "n_targets": mask.sum()}


def sampled_loss_fn(fraction: float) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A training loss on a random ``fraction`` of positions (the same for the whole batch).

    An unbiased estimate of ``loss_fn`` that skips most of the LM head, the costliest
    matmul of a small model with a large vocabulary. Positions are drawn from torch's
    global RNG, which the trainer checkpoints, so resuming stays bit-identical; in eval
    mode the exact loss is returned."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"loss fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return loss_fn

    def fn(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
        if not model.training:  # validation: the exact loss, and no RNG draw
            return loss_fn(model, ids, mask)
        T = ids.shape[1]
        n = max(1, round(fraction * T))
        pos = torch.randperm(T)[:n].sort().values.to(ids.device)  # [P]
        logits = model(ids, mask, pos)  # [B, P, V]
        sub_mask = mask.bool()[:, pos]  # [B, P]
        if not sub_mask.any():  # all drawn positions are padding: fall back to all of them
            return loss_fn(model, ids, mask)
        return _reconstruction_loss(logits, ids[:, pos], sub_mask)

    fn.loss_fraction = fraction  # type: ignore[attr-defined]  # for the trainer's MFU
    return fn
