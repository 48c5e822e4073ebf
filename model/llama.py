"""A Llama-style decoder-only transformer, in one file you can read top to bottom.

Architecture choices (each one is a line of code below):
- Decoder only, pre-norm: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); a final RMSNorm before the head.
- RMSNorm (no mean subtraction, no bias), computed in fp32 and cast back, weight applied after the cast
  (the Hugging Face Llama order, so our logits equal theirs).
- Rotary position embeddings (RoPE) in the "rotate_half" layout: a head vector is split in two halves
  (x1, x2) rotated as (x1 cos - x2 sin, x2 cos + x1 sin). This is the layout of Hugging Face
  `LlamaForCausalLM`, so its q/k weights load without the permutation Meta's interleaved layout needs.
  Base `rope_theta`; optional context-extension scaling ("linear" or Llama 3.1's "llama3").
  cos/sin are computed in fp32 from the positions at each forward (no table to overflow or to be cast to
  bf16 by the training engine).
- Grouped-query attention: H query heads share H_kv key/value heads (H_kv = H is plain multi-head).
- Causal attention with document masking: when `position_ids` are given, a document starts wherever
  position_ids == 0, a token attends only to earlier tokens of its own document, and RoPE uses those
  positions (they restart at 0 at each document start).
- SwiGLU MLP: W2(silu(W1 x) * W3 x), W1 and W3 stacked in one matrix `w13` (one matmul); likewise the
  q, k, v projections in `wqkv`. model/hf.py splits them into Hugging Face's separate matrices.
- No biases anywhere. Input embedding and output head tied or untied (`tie_embeddings`).
- Vocabulary padded up to a multiple of `vocab_multiple` (fast matmuls); padded ids are never targets.
- The loss is cross-entropy fused with the output projection, computed in chunks: the (tokens x vocab)
  logits are never held whole (model/ops.py).
- Initialisation: normal(0, init_std) for embeddings and every linear layer, except the two projections
  that write into the residual stream (attention output `wo`, MLP down `w2`), which use
  init_std / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2);
  norm weights are 1.

Notation (shape comments):
  B batch, T sequence length (tokens per row), D model width (dim), H query heads, H_kv key/value heads,
  Dh head dim (D / H), F MLP hidden width (ffn_dim), V padded vocabulary, S cached length (generation).

The attention kernel and fused ops are chosen in model/ops.py (detected once, logged once); every fast path
has a plain-PyTorch reference here (`rms_norm`, `apply_rope`, `cross_entropy_reference`; attention's and
the document masks are in ops.py, which the fast CPU path shares) that tests compare against. This file
imports torch only; ops.py is its leaf and never imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import ops
from model.ops import IGNORE_INDEX

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "reference")
KERNELS = ("auto", "torch", "liger", "reference")
ROPE_SCALING_TYPES = ("none", "linear", "llama3")


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched for a context longer than the one they were trained at.

    type: "none"; "linear" (every frequency / factor, i.e. positions / factor); "llama3" (Llama 3.1: low
    frequencies / factor, high ones unchanged, a smooth ramp between `low_freq_factor` and `high_freq_factor`).
    original_max_seq_len: the context the model was trained at before extension (0 = this config's
    max_seq_len, i.e. no extension).
    """

    type: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    vocab_size: int = 512
    vocab_multiple: int = 64  # the embedding and the head have padded_vocab_size rows
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "auto"  # auto | flash | sdpa | reference (model/ops.py)
    kernels: str = "auto"  # auto | torch | liger | reference: RMSNorm, SwiGLU, RoPE, loss (model/ops.py)
    compile: bool = False  # torch.compile each block (state-dict names unchanged)
    checkpoint_activations: bool = False  # recompute each block in backward (memory for compute)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # built from a plain dict (JSON, omegaconf container)
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "vocab_multiple"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be a positive integer")
        if self.max_seq_len < 1:
            _bad("max_seq_len", self.max_seq_len, "must be a positive integer")
        if self.dim % self.n_heads:
            _bad("n_heads", self.n_heads, f"must divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            _bad("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            _bad(
                "n_heads",
                self.n_heads,
                f"gives an odd head dim {self.head_dim} (dim / n_heads); RoPE needs it even",
            )
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "must be > 0")
        if self.attention not in ATTENTION_BACKENDS:
            _bad("attention", self.attention, f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.kernels not in KERNELS:
            _bad("kernels", self.kernels, f"must be one of {', '.join(KERNELS)}")
        rs = self.rope_scaling
        if rs.type not in ROPE_SCALING_TYPES:
            _bad("rope_scaling.type", rs.type, f"must be one of {', '.join(ROPE_SCALING_TYPES)}")
        if rs.original_max_seq_len < 0:
            _bad("rope_scaling.original_max_seq_len", rs.original_max_seq_len, "must be >= 0")
        if rs.type == "none":
            if rs.factor != 1.0:
                _bad("rope_scaling.factor", rs.factor, "needs rope_scaling.type linear or llama3")
            if rs.original_max_seq_len and self.max_seq_len > rs.original_max_seq_len:
                _bad(
                    "max_seq_len",
                    self.max_seq_len,
                    f"is longer than the RoPE context rope_scaling.original_max_seq_len="
                    f"{rs.original_max_seq_len} and rope_scaling.type is none: set type linear or llama3",
                )
        else:
            if not rs.factor > 1.0:
                _bad("rope_scaling.factor", rs.factor, f"must be > 1 for rope_scaling.type={rs.type}")
            if rs.original_max_seq_len == 0:
                _bad("rope_scaling.original_max_seq_len", 0, f"must be set for rope_scaling.type={rs.type}")
            if self.max_seq_len > rs.original_max_seq_len * rs.factor:
                _bad(
                    "max_seq_len",
                    self.max_seq_len,
                    f"is longer than the scaled RoPE context rope_scaling.original_max_seq_len x factor = "
                    f"{rs.original_max_seq_len} x {rs.factor}",
                )
            if rs.type == "llama3" and not 0 < rs.low_freq_factor < rs.high_freq_factor:
                _bad(
                    "rope_scaling.low_freq_factor",
                    rs.low_freq_factor,
                    f"must be > 0 and < rope_scaling.high_freq_factor={rs.high_freq_factor}",
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


def _bad(name: str, value: object, why: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r}: {why}")


LUCIE_VOCAB = 65024  # the Lucie tokenizer's vocabulary; the sizes below use it (override vocab_size)

# Sizes are code. Parameter counts (num_params, tied or not as set) are in docs/model.md and tested.
SIZES: dict[str, ModelConfig] = {
    # Tests and the CPU demo: GQA (4 query heads share 2 KV heads), two layers.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256),
    # ~125M with tied embeddings (GPT-2 small's width/depth, SwiGLU F = 8/3 D).
    "125m": ModelConfig(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=LUCIE_VOCAB,
        max_seq_len=2048, tie_embeddings=True,
    ),
    # ~350M with tied embeddings.
    "350m": ModelConfig(
        dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, vocab_size=LUCIE_VOCAB,
        max_seq_len=2048, tie_embeddings=True,
    ),
    # ~1B (Dh = 128 for the attention kernels).
    "1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=5632, vocab_size=LUCIE_VOCAB,
        max_seq_len=2048,
    ),
    # Lucie-7B's shape ("~8B" class, 6.7B parameters): 32 layers, d 4096, FFN 12288, 32 heads, 8 KV heads.
    "8b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=12288, vocab_size=LUCIE_VOCAB,
        max_seq_len=4096, rope_theta=500000.0,
    ),
    # ~23B: the same family scaled up (48 layers, d 6144, FFN 20480, 48 heads, 8 KV heads).
    "23b": ModelConfig(
        dim=6144, n_layers=48, n_heads=48, n_kv_heads=8, ffn_dim=20480, vocab_size=LUCIE_VOCAB,
        max_seq_len=4096, rope_theta=500000.0,
    ),
}  # fmt: skip


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    6 * N + 12 * n_layers * D * seq_len, where N counts the parameters that take part in matmuls: every
    non-embedding weight plus the output head (V * D, counted once even when tied to the embedding, since
    the head matmul runs either way; the embedding lookup is not a matmul; norm weights are negligible but
    included). The second term is attention's two (T x T) matmuls, QK^T and AV: 2 * 2 * T * D forward per
    token per layer, x3 for forward + backward. It counts the full T x T square, not the causal half (the
    PaLM / nanoGPT / torchtitan convention, so MFU figures compare across codebases).
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def matmul_params(cfg: ModelConfig) -> int:
    """N in flops_per_token: all parameters except the input embedding, plus the head (tied or not)."""
    D, Dh, F_ = cfg.dim, cfg.head_dim, cfg.ffn_dim
    attn = D * cfg.n_heads * Dh + 2 * D * cfg.n_kv_heads * Dh + cfg.n_heads * Dh * D  # wq, wk + wv, wo
    layer = attn + 3 * D * F_ + 2 * D  # w1, w2, w3 + two norms
    return cfg.n_layers * layer + D + cfg.padded_vocab_size * D  # + final norm + head


# ----------------------------------------------------------------------------------------------------
# Reference maths (the ground truth for the fast paths in model/ops.py)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 for half precision (fp64 stays fp64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """(Dh/2,) fp32 angular frequencies theta^(-2i/Dh), stretched by cfg.rope_scaling."""
    Dh, rs = cfg.head_dim, cfg.rope_scaling
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.int64).to(device, torch.float) / Dh)
    )
    if rs.type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.type == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are divided by factor; shorter
        # than original / high_freq_factor are kept; in between, a linear blend in original / wavelength.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = rs.original_max_seq_len / rs.low_freq_factor
        high_wavelen = rs.original_max_seq_len / rs.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_seq_len / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape (B, T, 1, Dh) for positions (B, T) (or B = 1 for all rows), in the rotate_half
    layout [f, f]."""
    angles = positions[..., None].float() * inv_freq  # (B, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (B, T, 1, Dh): broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # each (..., Dh/2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """q (B, T, H, Dh), k (B, T, H_kv, Dh), cos/sin (B, T, 1, Dh)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits = h weight^T over non-ignored targets; materialises all logits.
    h (N, D), weight (V, D), targets (N,)."""
    logits = (h @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------
# The network


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None  # () mean cross-entropy, when targets are given
    logits: torch.Tensor | None = None  # (B, T, V) when no targets are given


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, for generation: one slot per position.

    k[i], v[i]: (B, H_kv, S_max, Dh) for layer i; `valid` (B, S_max) marks real tokens (False = left
    padding); `length` = slots filled. Query t may attend slot s when s <= t and valid[s] (or s == t, so
    that a padding query still has one key and stays finite).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)  # (B, H_kv, S_max, Dh)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    def attention_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool for T new queries in slots [length, length + T) over keys [0, length + T)."""
        S = self.length + T
        q_slot = torch.arange(self.length, S, device=self.valid.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=self.valid.device)[None, :]  # (1, S)
        causal = k_slot <= q_slot  # (T, S)
        return ((causal[None] & self.valid[:, None, :S]) | (k_slot == q_slot)[None])[:, None]  # (B, 1, T, S)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.kernels = eps, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "reference":
            return rms_norm(x, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps, self.kernels)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, H_kv, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        # q, k and v projections stacked in one matrix (rows: H*Dh of q, then H_kv*Dh of k, then of v):
        # one matmul forward and one for the input gradient instead of three (and two adds).
        self.wqkv = nn.Linear(D, (H + 2 * H_kv) * Dh, bias=False)
        self.wo = nn.Linear(H * Dh, D, bias=False)
        self.qkv_split = (H * Dh, H_kv * Dh, H_kv * Dh)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: ops.Mask, cache: KVCache | None
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_split, dim=-1)  # (B, T, H*Dh), (B, T, H_kv*Dh) x 2
        q = q.view(B, T, cfg.n_heads, cfg.head_dim)  # (B, T, H, Dh)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)  # (B, T, H_kv, Dh)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim)  # (B, T, H_kv, Dh)
        if cfg.kernels == "reference":
            q, k = apply_rope(q, k, cos, sin)
        else:
            q, k = ops.apply_rope(q, k, cos, sin, cfg.kernels)
        if cache is None:
            y = ops.attention(q, k, v, mask)  # (B, T, H, Dh)
        else:
            # Generation: store this step's keys/values in their slots, attend over all slots so far.
            start, end = cache.length, cache.length + T
            cache.k[self.layer][:, :, start:end] = k.transpose(1, 2)  # (B, H_kv, T, Dh)
            cache.v[self.layer][:, :, start:end] = v.transpose(1, 2)  # (B, H_kv, T, Dh)
            y = ops.attention_dense(
                q.transpose(1, 2),  # (B, H, T, Dh)
                cache.k[self.layer][:, :, :end],  # (B, H_kv, S, Dh)
                cache.v[self.layer][:, :, :end],
                mask.dense,
                reference=mask.backend == "reference",
            ).transpose(1, 2)  # (B, T, H, Dh)
        return self.wo(y.reshape(B, T, cfg.n_heads * cfg.head_dim))  # (B, T, H*Dh) -> (B, T, D)


class DownProjection(nn.Linear):
    """w2(silu(gate) * up): the MLP's down projection taking [gate, up], so that the fused op can recompute
    the (B, T, F) activation in backward instead of keeping it. A module (state-dict name `w2.weight`) so
    that engines that gather parameters per module call (ZeRO-3) see its weight in use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.ffn_dim, cfg.dim, bias=False)
        self.kernels = cfg.kernels

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels == "reference":
            gate, up = gate_up.chunk(2, dim=-1)  # each (B, T, F)
            return F.linear(F.silu(gate) * up, self.weight)  # (B, T, F) -> (B, T, D)
        return ops.swiglu_down(gate_up, self.weight, self.kernels)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # gate (w1) and up (w3) projections stacked in one matrix: rows [0, F) gate, [F, 2F) up.
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = DownProjection(cfg)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.w13(x))  # [gate, up] (B, T, 2F) -> (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: ops.Mask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class OutputHead(nn.Linear):
    """The vocabulary projection; with targets it returns the loss directly (fused, chunked), so the
    (tokens x V) logits never exist. It is a module so that engines that gather parameters per module
    call (ZeRO-3) see its weight in use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.dim, cfg.padded_vocab_size, bias=False)
        self.kernels, self.compiled = cfg.kernels, cfg.compile

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(h, self.weight)  # (B, T, V)
        h = h.reshape(-1, h.shape[-1])  # (B*T, D)
        targets = targets.reshape(-1)  # (B*T,)
        if self.kernels == "reference":
            return cross_entropy_reference(h, self.weight, targets)
        return ops.linear_cross_entropy(h, self.weight, targets, self.kernels, compiled=self.compiled)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.output = OutputHead(cfg)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one Parameter, two uses
        self._inv_freq: torch.Tensor | None = None  # fp32, not a buffer: engines cast buffers to bf16
        self.init_weights()
        if cfg.compile:
            for block in self.layers:
                block.compile()  # in place: parameter names stay "layers.N...."

    def init_weights(self) -> None:
        """The scheme in the header: N(0, init_std); residual projections N(0, init_std / sqrt(2 L))."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:  # embedding (= head when tied), head, wqkv, w13
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, include_embedding: bool = True) -> int:
        """Distinct parameters (a tied embedding/head counts once); without the input embedding if asked."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embedding and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); position_ids (B, T) restarting at 0 at each document (None: one document
        per row, positions 0..T-1); targets (B, T) with IGNORE_INDEX where not scored. With targets the
        output has the mean loss and no logits; without, the logits (B, T, V). `cache` (generation):
        position_ids are required and tokens fill the cache's next T slots."""
        cfg = self.cfg
        B, T = input_ids.shape
        if cache is None and T > cfg.max_seq_len:
            raise ValueError(f"input length {T} > ModelConfig.max_seq_len={cfg.max_seq_len}")
        if cache is not None and position_ids is None:
            raise ValueError("forward with a KV cache needs position_ids")
        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(cfg, input_ids.device)
        positions = position_ids
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T): the same for every row

        h = self.tok_embeddings(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self._inv_freq, positions, h.dtype)  # each (B or 1, T, 1, Dh)
        if cache is None:
            mask = ops.make_mask(cfg.attention, position_ids, B, T, input_ids.device, h.dtype)
        else:
            mask = ops.Mask(
                backend="reference" if cfg.attention == "reference" else "sdpa", dense=cache.attention_mask(T)
            )
        for block in self.layers:
            if cfg.checkpoint_activations and torch.is_grad_enabled() and cache is None:
                h = checkpoint(block, h, cos, sin, mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        h = self.norm(h)  # (B, T, D)

        if targets is None:
            return ModelOutput(logits=self.output(h))  # (B, T, V)
        return ModelOutput(loss=self.output(h, targets))


def config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from a plain dict (as saved with dataclasses.asdict in a checkpoint); checked."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
    return ModelConfig(**d)
