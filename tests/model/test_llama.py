"""The Transformer: loss and gradients of the fast paths vs the reference maths, document masking, init."""

import dataclasses
import math

import pytest
import torch

from model import ops
from model.llama import SIZES, RopeScaling, Transformer, cross_entropy_reference, rope_inv_freq
from model.ops import IGNORE_INDEX, attention_mask

TINY = SIZES["tiny"]


def make_pair(cfg=TINY, **fast_changes):
    """A fast model and a reference model (plain maths everywhere) with the same weights."""
    torch.manual_seed(0)
    fast = Transformer(dataclasses.replace(cfg, **fast_changes))
    ref = Transformer(dataclasses.replace(cfg, attention="reference", kernels="reference"))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def packed_batch(B=2, T=48, vocab=TINY.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    pos = torch.stack(
        [
            torch.cat([torch.arange(20) + 7, torch.arange(28)]),
            torch.cat([torch.arange(5), torch.arange(30), torch.arange(13)]),
        ]
    )  # row 0 starts mid-document (positions 7..26), then a new document; row 1 has three documents
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :3] = IGNORE_INDEX
    return ids, pos[:B, :T], targets


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_paths_match_reference_loss_and_grads(attention, packed):
    fast, ref = make_pair(attention=attention)
    ids, pos, targets = packed_batch()
    pos = pos if packed else None
    loss_f = fast(ids, pos, targets).loss
    loss_r = ref(ids, pos, targets).loss
    loss_f.backward()
    loss_r.backward()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=1e-6)
    gf, gr = grads(fast), grads(ref)
    for name in gr:
        torch.testing.assert_close(gf[name], gr[name], rtol=1e-4, atol=1e-7, msg=name)


def test_loss_is_mean_cross_entropy_of_logits():
    fast, _ = make_pair()
    ids, pos, targets = packed_batch()
    with torch.no_grad():
        logits = fast(ids, pos).logits
        loss = fast(ids, pos, targets).loss
    assert logits.shape == (2, 48, TINY.padded_vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert fast(ids, pos, targets).logits is None


def test_document_masking_equals_documents_run_alone():
    """Packed documents give the logits each document gets on its own (positions restart, no leaking)."""
    fast, ref = make_pair()
    ids, pos, _ = packed_batch()
    row = 1
    with torch.no_grad():
        for model in (fast, ref):
            packed = model(ids, pos).logits[row]  # (T, V)
            starts = [0, 5, 35, 48]
            for a, b in zip(starts[:-1], starts[1:]):
                alone = model(ids[row : row + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)


def test_without_position_ids_is_one_causal_document():
    fast, _ = make_pair()
    ids, _, _ = packed_batch()
    with torch.no_grad():
        a = fast(ids).logits
        b = fast(ids, torch.arange(48).expand(2, 48)).logits
        # causality: changing a later token leaves earlier logits unchanged
        ids2 = ids.clone()
        ids2[:, 30] = (ids2[:, 30] + 1) % TINY.vocab_size
        c = fast(ids2).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:, :30], c[:, :30])
    assert not torch.allclose(a[:, 30:], c[:, 30:])


def test_attention_mask_semantics():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0]])
    m = attention_mask(pos, 6, torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_ignored_targets_and_all_ignored():
    fast, ref = make_pair()
    ids, pos, targets = packed_batch()
    targets[:, ::2] = IGNORE_INDEX
    torch.testing.assert_close(
        fast(ids, pos, targets).loss, ref(ids, pos, targets).loss, rtol=1e-6, atol=1e-6
    )
    none = torch.full_like(targets, IGNORE_INDEX)
    loss = fast(ids, pos, none).loss
    loss.backward()
    assert loss.item() == 0.0
    assert fast.output.weight.grad.abs().sum() == 0


def test_tied_embeddings_share_one_parameter():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    fast, ref = make_pair(cfg)
    assert fast.output.weight is fast.tok_embeddings.weight
    assert fast.num_params() == sum(p.numel() for p in fast.parameters())
    ids, pos, targets = packed_batch()
    fast(ids, pos, targets).loss.backward()
    ref(ids, pos, targets).loss.backward()
    torch.testing.assert_close(
        fast.tok_embeddings.weight.grad, ref.tok_embeddings.weight.grad, rtol=1e-4, atol=1e-7
    )


def test_init_scheme_stds():
    """N(0, init_std) everywhere, init_std / sqrt(2 L) on wo and w2, norms at 1 (checked on a model
    big enough for the sample std to be within 2%)."""
    cfg = dataclasses.replace(TINY, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=512, n_layers=8, init_std=0.03)
    torch.manual_seed(0)
    m = Transformer(cfg)
    residual = 0.03 / math.sqrt(2 * 8)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = residual if name.endswith(("wo.weight", "w2.weight")) else 0.03
        assert abs(p.std().item() / want - 1) < 0.02, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.05 * want, name


def test_activation_checkpointing_same_grads():
    fast, _ = make_pair()
    ck, _ = make_pair(checkpoint_activations=True)
    ids, pos, targets = packed_batch()
    fast(ids, pos, targets).loss.backward()
    ck(ids, pos, targets).loss.backward()
    for name, g in grads(fast).items():
        torch.testing.assert_close(g, dict(ck.named_parameters())[name].grad, msg=name)


def test_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024, rope_theta=5000.0)
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    cases = [
        ("linear", RopeScaling("linear", 4.0, 256), dict(rope_type="linear", factor=4.0)),
        (
            "llama3",
            RopeScaling("llama3", 8.0, 128, 1.0, 4.0),
            dict(llama3, original_max_position_embeddings=128),
        ),
    ]
    for kind, ours, theirs in cases:
        cfg = dataclasses.replace(TINY, max_seq_len=1024, rope_theta=5000.0, rope_scaling=ours)
        hcfg = LlamaConfig(**hf, rope_parameters=dict(theirs, rope_theta=5000.0))
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hcfg, torch.device("cpu"))
        torch.testing.assert_close(rope_inv_freq(cfg), expected, rtol=0, atol=0)
    plain = rope_inv_freq(dataclasses.replace(TINY, rope_theta=5000.0))
    torch.testing.assert_close(
        plain, 1.0 / 5000.0 ** (torch.arange(0, 16, 2).double() / 16), check_dtype=False
    )


def test_sequence_longer_than_max_seq_len_is_refused():
    m = Transformer(dataclasses.replace(TINY, max_seq_len=16))
    with pytest.raises(ValueError, match="input length 17 > ModelConfig.max_seq_len=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_cross_entropy_reference_is_float64_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (10,), generator=g)
    logits = h.double() @ w.double().t()
    expected = (logits.logsumexp(-1) - logits.gather(1, t[:, None])[:, 0]).mean()
    torch.testing.assert_close(cross_entropy_reference(h, w, t).double(), expected, rtol=1e-6, atol=1e-6)


def test_compiled_blocks_match_eager(monkeypatch):
    """ModelConfig.compile traces each block through Dynamo + AOTAutograd (custom autograd Functions,
    masks) and keeps parameter names. The backend is aot_eager here (Inductor's C++ codegen takes ~40 s
    on 2 cores); benchmarks/bench_model.py and gpu_check.py run the real Inductor."""
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="aot_eager")
    )
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch._dynamo.optimize("aot_eager")(fn))
    ops._compiled_cross_entropy_chunk.cache_clear()
    torch._dynamo.reset()
    fast, ref = make_pair(compile=True)
    ids, pos, targets = packed_batch()
    for p in (pos, None):
        loss = fast(ids, p, targets).loss
        loss.backward()
        torch.testing.assert_close(loss, ref(ids, p, targets).loss, rtol=1e-5, atol=1e-5)
    assert set(fast.state_dict()) == set(ref.state_dict())
    ops._compiled_cross_entropy_chunk.cache_clear()
