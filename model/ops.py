"""Attention backends and fused ops: the one place where optional accelerators are detected.

What is available is detected once (`available()`) and logged once per device type and dtype; every
fast path falls back to plain PyTorch, and each has a reference (in model/llama.py; the attention's and
the document masks here, which the fast CPU path uses too) that tests compare against (tests/model/test_ops.py; `gpu`-marked where the fast path only runs on CUDA).

Attention (ModelConfig.attention):
- "flash": flash-attn; packed documents through flash_attn_varlen_func with cu_seqlens. CUDA, bf16/fp16.
- "sdpa": torch scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels on GPU). With
  document masking: FlexAttention with a block mask on CUDA (blocks outside every document are skipped);
  on CPU an explicit boolean (T x T) mask, because FlexAttention has no backward on CPU.
- "reference": the plain-maths attention below (`attention_reference`), with the dense mask.
- "auto": flash when usable (CUDA, flash-attn importable, half precision), else sdpa.

Fused ops (ModelConfig.kernels): RMSNorm, SwiGLU, RoPE and linear + cross-entropy.
- "liger": liger-kernel's Triton kernels (CUDA only; an error if missing).
- "torch": the PyTorch implementations below: custom autograd Functions that save only their inputs
  (and recompute the cheap elementwise parts in backward), and a chunked linear + cross-entropy.
- "auto": liger on CUDA tensors when installed, else torch.
- "reference" never reaches these (llama.py uses its own maths).

This module is the model's leaf: it imports torch only, and llama.py imports it, never the reverse.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("model.ops")

IGNORE_INDEX = -100  # a target equal to this is not scored (padding, prompt tokens, document starts)
HALF = (torch.bfloat16, torch.float16)


_AVAILABLE: dict[str, bool] = {}


def available() -> dict[str, bool]:
    """Which optional accelerators can be imported here (detected once per process)."""
    if _AVAILABLE:
        return _AVAILABLE
    found = {
        "cuda": torch.cuda.is_available(),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
        "flex_attention": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
    }
    for name, module in (
        ("flash_attn", "flash_attn"),
        ("liger_kernel", "liger_kernel.transformers.functional"),
    ):
        if found[name] and found["cuda"]:
            try:  # a wheel built for another CUDA/torch, or a missing triton, fails here
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001
                log.warning("%s is installed but does not import (%s): not used", module, e)
                found[name] = False
    log.info("model.ops: available %s", ", ".join(k for k, v in found.items() if v) or "nothing optional")
    _AVAILABLE.update(found)
    return _AVAILABLE


_LOGGED: set[tuple[str, str]] = set()


def _log_choice(what: str, choice: str, why: str) -> None:
    """Log a backend choice the first time it is made (not from inside torch.compile tracing)."""
    if (what, choice) in _LOGGED or torch.compiler.is_compiling():
        return
    _LOGGED.add((what, choice))
    log.info("model.ops: %s = %s (%s)", what, choice, why)


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend that runs for this device and dtype ("flash", "sdpa" or "reference")."""
    have = available()
    flash_ok = device.type == "cuda" and have["flash_attn"] and dtype in HALF
    if requested == "flash" and not flash_ok:
        why = "no CUDA device" if device.type != "cuda" else "flash-attn not importable"
        if device.type == "cuda" and have["flash_attn"]:
            why = f"dtype {dtype} (flash-attn needs bf16/fp16)"
        raise ValueError(f"ModelConfig.attention='flash' cannot run: {why}")
    if requested == "auto":
        chosen = "flash" if flash_ok else "sdpa"
        why = "flash-attn on CUDA" if flash_ok else f"flash-attn unusable on {device.type}/{dtype}"
    else:
        chosen, why = requested, "requested"
    _log_choice(f"attention[{device.type}, {dtype}]", chosen, why)
    return chosen


def use_liger(kernels: str, x: torch.Tensor) -> bool:
    if kernels == "torch":
        return False
    ok = x.is_cuda and available()["liger_kernel"]
    if kernels == "liger" and not ok:
        why = "no CUDA tensor" if not x.is_cuda else "liger-kernel not installed"
        raise ValueError(f"ModelConfig.kernels='liger' cannot run: {why}")
    _log_choice(
        f"kernels[{x.device.type}]", "liger" if ok else "torch", "auto" if kernels == "auto" else "requested"
    )
    return ok


# ----------------------------------------------------------------------------------------------------
# Attention


# Masks and plain-maths attention (the reference the fast kernels are tested against)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the document each token belongs to: a new one starts where position_ids == 0."""
    return (position_ids == 0).cumsum(dim=-1)


def attention_mask(position_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, T) bool, True where query t may attend key s: s <= t and same document."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    if position_ids is None:
        return causal[None, None]  # (1, 1, T, T)
    doc = document_ids(position_ids)  # (B, T)
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    return (causal & same_doc)[:, None]  # (B, 1, T, T): broadcast over heads


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) masked) v, plain maths. q (B, H, T, Dh); k, v (B, H_kv, S, Dh);
    allowed (B or 1, 1, T, S) bool. Returns (B, H, T, Dh)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, Dh): query head h uses KV head h // groups
    v = v.repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.to(torch.promote_types(q.dtype, torch.float32)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).to(q.dtype) @ v  # (B, H, T, Dh)


@dataclass
class Mask:
    """What the attention kernel needs to know about who attends whom, prepared once per forward.

    Exactly one of: causal (no documents), dense (B or 1, 1, T, S) bool, block_mask (FlexAttention),
    cu_seqlens + max_seqlen (flash varlen: documents laid end to end over the flattened B*T tokens).
    """

    backend: str
    causal: bool = False
    dense: torch.Tensor | None = None
    block_mask: Any = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def make_mask(
    requested: str,
    position_ids: torch.Tensor | None,
    B: int,
    T: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Mask:
    backend = resolve_attention(requested, device, dtype)
    if backend == "reference":
        return Mask(backend, dense=attention_mask(position_ids, T, device))
    if position_ids is None:
        return Mask(backend, causal=True)
    if backend == "flash":
        starts = position_ids == 0  # (B, T)
        starts[:, 0] = True  # each row starts a sequence, even mid-document (its own positions kept)
        flat_starts = starts.reshape(-1).nonzero().flatten()  # (n_docs,) offsets into B*T
        total = torch.tensor([B * T], device=device)
        cu_seqlens = torch.cat([flat_starts, total]).to(torch.int32)  # (n_docs + 1,)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return Mask(backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if device.type == "cuda" and available()["flex_attention"]:
        from torch.nn.attention.flex_attention import create_block_mask

        doc = document_ids(position_ids)  # (B, T)

        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        block_mask = create_block_mask(same_document_causal, B, None, T, T, device=device)
        return Mask(backend, block_mask=block_mask)
    return Mask(backend, dense=attention_mask(position_ids, T, device))


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # FlexAttention is only fast compiled


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Causal (document-masked) attention. q (B, T, H, Dh); k, v (B, T, H_kv, Dh). Returns (B, T, H, Dh)."""
    B, T, H, Dh = q.shape
    gqa = k.shape[2] != H
    if mask.backend == "flash":
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if mask.cu_seqlens is None:
            return flash_attn_func(q, k, v, causal=True)  # (B, T, H, Dh); GQA native
        y = flash_attn_varlen_func(
            q.reshape(B * T, H, Dh),  # (B*T, H, Dh): documents end to end
            k.reshape(B * T, -1, Dh),  # (B*T, H_kv, Dh)
            v.reshape(B * T, -1, Dh),
            mask.cu_seqlens,
            mask.cu_seqlens,
            mask.max_seqlen,
            mask.max_seqlen,
            causal=True,
        )
        return y.view(B, T, H, Dh)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, Dh)
    if mask.block_mask is not None:
        y = _compiled_flex_attention()(qt, kt, vt, block_mask=mask.block_mask, enable_gqa=gqa)
    elif mask.causal:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        y = attention_dense(qt, kt, vt, mask.dense, reference=mask.backend == "reference")
    return y.transpose(1, 2)  # (B, T, H, Dh)


def attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, reference: bool = False
) -> torch.Tensor:
    """Attention with an explicit mask. q (B, H, T, Dh); k, v (B, H_kv, S, Dh); allowed (B|1, 1, T, S)."""
    if reference:
        return attention_reference(q, k, v, allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU, RoPE: autograd Functions that keep only their inputs for backward


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)) with the normalisation in fp32, as llama.rms_norm. Saves x and 1/rms (a
    (..., 1) tensor) instead of the fp32 copies autograd would keep."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for half inputs, fp64 stays fp64
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd  # (..., D)
        grad_weight = (grad.to(rstd.dtype) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = grad.to(rstd.dtype) * weight.to(rstd.dtype)  # d loss / d xhat
        # d xhat / d x = rstd * (I - xhat xhat^T / D)
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str) -> torch.Tensor:
    if use_liger(kernels, x):
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, weight, eps, 0.0, "llama", False)
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (silu(gate) is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # fused: grad * up * silu'(gate)
        return grad_gate, grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: str) -> torch.Tensor:
    if use_liger(kernels, gate):
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)
    return _SwiGLU.apply(gate, up)


class _SwiGLUDown(torch.autograd.Function):
    """w2(silu(gate) * up) for gate_up = [gate, up] (the stacked w13 output), saving gate_up and w2's
    weight only: the (B, T, F) activation that the down projection would otherwise keep for its weight
    gradient is recomputed in backward (one cheap elementwise pass), which removes one F-wide tensor per
    layer from the activation memory. The input gradient is written straight into one [gate, up] tensor."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, weight)
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., F)
        return F.linear(F.silu(gate) * up, weight)  # (..., F) -> (..., D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., F)
        silu = F.silu(gate)  # (..., F)
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, D)
        grad_weight = grad_2d.t() @ (silu * up).reshape(-1, gate.shape[-1])  # (D, F)
        grad_act = (grad_2d @ weight).view(gate.shape)  # (..., F)
        if torch.compiler.is_compiling():  # no out= writes into views under Dynamo (see _rotate)
            grad_up = grad_act * silu
            grad_gate = torch.ops.aten.silu_backward(grad_act * up, gate)
            return torch.cat((grad_gate, grad_up), dim=-1), grad_weight
        grad_gate_up = torch.empty_like(gate_up)  # (..., 2F)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad_act, silu, out=grad_up)
        # grad_act * up * silu'(gate), fused
        torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)
        return grad_gate_up, grad_weight


def swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor, kernels: str) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T: the SwiGLU MLP after its input projection. gate_up (..., 2F) is
    [gate, up] along the last dim, weight (D, F). Returns (..., D)."""
    if use_liger(kernels, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(swiglu(gate.contiguous(), up.contiguous(), kernels), weight)
    return _SwiGLUDown.apply(gate_up, weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x cos + rotate_half(x) sin, i.e. each half-pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), written
    half by half into a new contiguous tensor: no rotate_half copy, no cat, one fused multiply-add per
    half (the plain formula makes ~5 passes over x). inverse=True rotates by -angle (the adjoint).
    x (B, T, H, Dh); cos, sin (B or 1, T, 1, Dh) in the [f, f] layout, of which one half is used."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # (B or 1, T, 1, Dh/2)
    x1, x2 = x[..., :half], x[..., half:]  # each (B, T, H, Dh/2)
    sign = 1.0 if inverse else -1.0
    if torch.compiler.is_compiling():
        # Dynamo mis-traces out= writes into views inside an autograd.Function; Inductor fuses this anyway.
        return torch.cat((x1 * c + sign * (x2 * s), x2 * c - sign * (x1 * s)), dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: .view() after it is free
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=sign)  # x1 c -/+ x2 s
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=-sign)  # x2 c +/- x1 s
    return out


class _Rope(torch.autograd.Function):
    """q cos + rotate_half(q) sin for q and k; saves cos and sin only (a rotation's backward is the
    inverse rotation)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_q, cos, sin, inverse=True), _rotate(grad_k, cos, sin, inverse=True), None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, Dh), k (B, T, H_kv, Dh), cos/sin (B, T, 1, Dh)."""
    if use_liger(kernels, q):
        from liger_kernel.transformers.functional import liger_rope

        # liger takes (B, H, T, Dh) views and cos/sin (B, T, Dh)
        qr, kr = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos[:, :, 0], sin[:, :, 0])
        return qr.transpose(1, 2), kr.transpose(1, 2)  # (B, T, H, Dh), (B, T, H_kv, Dh)
    return _Rope.apply(q, k, cos, sin)


# ----------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy


DEFAULT_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (8 Mi: 32 MiB in fp32)


def _cross_entropy_chunk(
    h_c: torch.Tensor,
    weight: torch.Tensor,
    t_c: torch.Tensor,
    s_c: torch.Tensor,
    n_scored: torch.Tensor,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: (summed loss, gradient of the mean loss w.r.t. the chunk's logits or None).
    h_c (n, D), weight (V, D), t_c (n,) targets, s_c (n,) scored mask, n_scored () float."""
    acc = n_scored.dtype
    logits = (h_c @ weight.t()).to(acc)  # (n, V)
    safe_t = torch.where(s_c, t_c, 0)  # ignored rows point anywhere; they are zeroed below
    target_logit = logits.gather(1, safe_t[:, None])  # (n, 1)
    # logsumexp by hand, in place, so the softmax needed for the gradient comes for free
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exp = logits.sub_(row_max).exp_()  # (n, V), overwrites the logits
    sum_exp = exp.sum(dim=-1, keepdim=True)  # (n, 1)
    loss_sum = ((row_max + sum_exp.log() - target_logit)[:, 0] * s_c).sum()
    if not grads:
        return loss_sum, None
    row_scale = s_c.to(acc)[:, None] / n_scored  # (n, 1): 1/n_scored, 0 for ignored rows
    grad_logits = exp.mul_(row_scale / sum_exp)  # (n, V) softmax * scale, in place
    grad_logits[torch.arange(h_c.shape[0], device=h_c.device), safe_t] -= row_scale[:, 0]
    return loss_sum, grad_logits.to(h_c.dtype)


@functools.cache
def _compiled_cross_entropy_chunk():
    # Inductor fuses the softmax / gradient passes over the (n, V) chunk into a couple of loops.
    return torch.compile(_cross_entropy_chunk, dynamic=False)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h W^T, chunk by chunk of tokens, gradients computed on the way.

    For each chunk of rows: logits (n, V) in fp32, loss += logsumexp - logit[target], and straight away
    the gradient of the mean loss with respect to those logits, softmax - onehot(target) (divided by the
    number of scored tokens), turned into grad_h (chunk rows) and accumulated into grad_W. Only one chunk's
    logits exist at a time; backward just scales the stored gradients by the incoming gradient. The three
    matmuls per chunk (logits, grad_h, grad_W) are the same three that forward + backward would do anyway.
    """

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int,
        grads: bool,
        compiled: bool,
    ):
        N = h.shape[0]
        scored = targets != IGNORE_INDEX  # (N,)
        acc = torch.promote_types(h.dtype, torch.float32)  # logits, loss and grad_W accumulate in >= fp32
        n_scored = scored.sum().clamp(min=1).to(acc)
        # needs_input_grad is set even under torch.no_grad(): `grads` says whether autograd is recording
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        chunk_fn = _compiled_cross_entropy_chunk() if compiled else _cross_entropy_chunk
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            h_c = h[start:end]  # (n, D)
            loss_sum, grad_logits = chunk_fn(
                h_c, weight, targets[start:end], scored[start:end], n_scored, need_h or need_w
            )
            loss += loss_sum
            if need_h:
                torch.mm(grad_logits, weight, out=grad_h[start:end])  # (n, D)
            if need_w:
                if grad_w.dtype == h.dtype:
                    grad_w.addmm_(grad_logits.t(), h_c)  # (V, D), in place
                else:  # half-precision matmul, accumulated in fp32
                    grad_w += grad_logits.t() @ h_c
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n_scored

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: this graph is not back-propagated twice
        gh = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    kernels: str = "torch",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 of logits = h weight^T, never holding all the logits.
    h (N, D), weight (V, D), targets (N,). A () fp32 tensor (0 when nothing is scored). `compiled`: the
    per-chunk maths goes through torch.compile (ModelConfig.compile)."""
    if use_liger(kernels, h):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=IGNORE_INDEX)
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk_rows, torch.is_grad_enabled(), compiled)
