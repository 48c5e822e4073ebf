"""Each fast path in model/ops.py against the reference maths (model/llama.py, and the attention's in ops)."""

import pytest
import torch

from model import ops
from model.llama import apply_rope, cross_entropy_reference, rms_norm
from model.ops import IGNORE_INDEX, attention_mask, attention_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gen = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)


def test_rms_norm_function_gradcheck_and_forward():
    x, w = rand(3, 5, 8), rand(8)
    assert torch.autograd.gradcheck(lambda x, w: ops._RMSNorm.apply(x, w, 1e-5), (x, w))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, "torch"), rms_norm(x, w, 1e-5))


def test_swiglu_function_gradcheck_and_forward():
    g, u = rand(4, 6), rand(4, 6)
    assert torch.autograd.gradcheck(ops._SwiGLU.apply, (g, u))
    torch.testing.assert_close(ops.swiglu(g, u, "torch"), torch.nn.functional.silu(g) * u)


def test_swiglu_down_function_gradcheck_and_forward():
    """The fused SwiGLU + down projection (activation recomputed in backward) against the plain maths."""
    gate_up, w = rand(2, 3, 12), rand(5, 6)  # [gate, up] stacked on the last dim, as w13 gives them
    assert torch.autograd.gradcheck(ops._SwiGLUDown.apply, (gate_up, w))
    g, u = gate_up[..., :6], gate_up[..., 6:]
    want = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w)
    torch.testing.assert_close(ops.swiglu_down(gate_up, w, "torch"), want)


def test_rope_broadcast_over_batch_matches_reference():
    """cos/sin of batch 1 (position_ids=None: the same positions for every row) broadcast over B."""
    q, k = rand(3, 5, 4, 8), rand(3, 5, 2, 8)
    angles = torch.rand(1, 5, 1, 4, generator=gen, dtype=torch.float64) * 10
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    assert torch.autograd.gradcheck(lambda q, k: ops._Rope.apply(q, k, cos, sin), (q, k))
    for got, want in zip(ops.apply_rope(q, k, cos, sin, "torch"), apply_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def test_rope_function_gradcheck_and_forward():
    q, k = rand(2, 5, 4, 8), rand(2, 5, 2, 8)
    angles = torch.rand(2, 5, 1, 4, generator=gen, dtype=torch.float64) * 10
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    assert torch.autograd.gradcheck(lambda q, k: ops._Rope.apply(q, k, cos, sin), (q, k))
    for got, want in zip(ops.apply_rope(q, k, cos, sin, "torch"), apply_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "chunk_elements", [7 * 50, 1 << 23]
)  # 7 rows per chunk (not dividing 30), or one chunk
def test_chunked_linear_cross_entropy_matches_reference(chunk_elements):
    h, w = rand(30, 16), rand(50, 16)
    t = torch.randint(0, 50, (30,), generator=gen)
    t[::4] = IGNORE_INDEX
    got = ops.linear_cross_entropy(h, w, t, "torch", chunk_elements)
    want = cross_entropy_reference(h, w, t)
    torch.testing.assert_close(got, want.to(got.dtype))
    gh, gw = torch.autograd.grad(got * 3.0, (h, w))  # a non-unit incoming gradient
    rh, rw = torch.autograd.grad(want * 3.0, (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_chunked_linear_cross_entropy_no_grad_and_fp32():
    h, w = rand(64, 32, dtype=torch.float32), rand(100, 32, dtype=torch.float32)
    t = torch.randint(0, 100, (64,), generator=gen)
    with torch.no_grad():
        got = ops.linear_cross_entropy(h, w, t, "torch", 100 * 10)
    assert got.grad_fn is None
    torch.testing.assert_close(got, cross_entropy_reference(h, w, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_attention_matches_reference(packed):
    B, T, H, H_kv, Dh = 2, 12, 4, 2, 8
    q, k, v = rand(B, T, H, Dh), rand(B, T, H_kv, Dh), rand(B, T, H_kv, Dh)
    pos = (
        torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1], [4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
        if packed
        else None
    )
    mask = ops.make_mask("sdpa", pos, B, T, torch.device("cpu"), torch.float64)
    assert mask.causal == (not packed) and (mask.dense is not None) == packed
    got = ops.attention(q, k, v, mask)  # (B, T, H, Dh)
    want = attention_reference(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask(pos, T, torch.device("cpu"))
    ).transpose(1, 2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0], torch.autograd.grad(want.sum(), q)[0])


def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert ops.resolve_attention("auto", cpu, torch.float32) == "sdpa"
    assert ops.resolve_attention("reference", cpu, torch.float32) == "reference"
    with pytest.raises(ValueError, match="ModelConfig.attention='flash' cannot run: no CUDA device"):
        ops.resolve_attention("flash", cpu, torch.bfloat16)
    x = torch.zeros(2)
    assert not ops.use_liger("auto", x) and not ops.use_liger("torch", x)
    with pytest.raises(ValueError, match="ModelConfig.kernels='liger' cannot run: no CUDA tensor"):
        ops.use_liger("liger", x)


# ---------------------------------------------------------------------------------------------------- GPU


def _cuda_inputs(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, H_kv, Dh = 2, 256, 8, 2, 64
    q, k, v = (torch.randn(B, T, n, Dh, device="cuda", dtype=dtype, generator=g) for n in (H, H_kv, H_kv))
    pos = torch.cat([torch.arange(100), torch.arange(156)]).expand(B, T).cuda().clone()
    pos[1] = torch.cat([torch.arange(30) + 9, torch.arange(200), torch.arange(26)]).cuda()
    return q, k, v, pos


def _reference_attention(q, k, v, pos):
    allowed = attention_mask(pos, q.shape[1], q.device)
    return attention_reference(*(t.float().transpose(1, 2) for t in (q, k, v)), allowed).transpose(1, 2)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_attention_backends_match_reference(backend, packed):
    if backend == "flash" and not ops.available()["flash_attn"]:
        pytest.skip("flash-attn not installed")
    q, k, v, pos = _cuda_inputs()
    pos = pos if packed else None
    mask = ops.make_mask(backend, pos, q.shape[0], q.shape[1], q.device, q.dtype)
    got = ops.attention(q, k, v, mask).float()
    torch.testing.assert_close(got, _reference_attention(q, k, v, pos), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.gpu
def test_gpu_liger_kernels_match_reference():
    if not ops.available()["liger_kernel"]:
        pytest.skip("liger-kernel not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 64, 256, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(256, device="cuda", generator=g, requires_grad=True)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, "liger"), rms_norm(x, w, 1e-5), rtol=1e-4, atol=1e-4)
    a, b = torch.randn(2, 2, 64, 512, device="cuda", generator=g)
    torch.testing.assert_close(
        ops.swiglu(a, b, "liger"), torch.nn.functional.silu(a) * b, rtol=1e-4, atol=1e-4
    )
    q, k = (
        torch.randn(2, 64, 8, 64, device="cuda", generator=g),
        torch.randn(2, 64, 2, 64, device="cuda", generator=g),
    )
    angles = torch.rand(2, 64, 1, 32, device="cuda", generator=g) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    for got, want in zip(ops.apply_rope(q, k, cos, sin, "liger"), apply_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    h = torch.randn(512, 256, device="cuda", generator=g, requires_grad=True)
    wt = torch.randn(1000, 256, device="cuda", generator=g, requires_grad=True) * 0.05
    t = torch.randint(0, 1000, (512,), device="cuda", generator=g)
    t[::5] = IGNORE_INDEX
    got = ops.linear_cross_entropy(h, wt, t, "liger")
    want = cross_entropy_reference(h, wt, t)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0], rtol=1e-3, atol=1e-5
    )


@cuda
@pytest.mark.gpu
def test_gpu_chunked_loss_bf16_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 512, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(8192, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05).requires_grad_(True)
    t = torch.randint(0, 8192, (4096,), device="cuda", generator=g)
    got = ops.linear_cross_entropy(h, w, t, "torch", 1 << 20)
    want = cross_entropy_reference(h, w, t)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_compiled_chunk_matches_eager(monkeypatch):
    """The compiled per-chunk maths (ModelConfig.compile) gives the eager chunk's loss and gradients
    (traced with aot_eager here; Inductor runs in the benchmarks)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch._dynamo.optimize("aot_eager")(fn))
    ops._compiled_cross_entropy_chunk.cache_clear()
    h, w = rand(30, 16, dtype=torch.float32), rand(50, 16, dtype=torch.float32)
    t = torch.randint(0, 50, (30,), generator=gen)
    t[::3] = IGNORE_INDEX
    got = ops.linear_cross_entropy(h, w, t, "torch", 8 * 50, compiled=True)
    want = ops.linear_cross_entropy(h, w, t, "torch", 8 * 50)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b)
    ops._compiled_cross_entropy_chunk.cache_clear()
