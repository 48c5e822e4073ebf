"""KV-cache generation: batches equal one-at-a-time runs, stop tokens, sampling."""

import pytest
import torch

from model.generate import generate, sample_next
from model.llama import SIZES, Transformer

TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(TINY)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)  # spread the logits: greedy choices far from ties
    return m


PROMPTS = [[1, 17, 33, 92, 8], [1, 5], [1, 400, 401, 402, 403, 404, 405, 406, 407], [9]]


def test_batch_equals_one_at_a_time_greedy(model):
    batch = generate(model, PROMPTS, max_new_tokens=20)
    assert [len(o) for o in batch] == [20] * 4
    for prompt, out in zip(PROMPTS, batch):
        assert generate(model, [prompt], max_new_tokens=20)[0] == out


def test_cache_matches_full_recompute(model):
    """Greedy with the cache = argmax of a full forward over prompt + tokens so far."""
    prompt = PROMPTS[0]
    out = generate(model, [prompt], max_new_tokens=10)[0]
    seq = list(prompt)
    with torch.no_grad():
        for tok in out:
            assert model(torch.tensor([seq])).logits[0, -1, : TINY.vocab_size].argmax().item() == tok
            seq.append(tok)


def test_stop_tokens_end_each_row_separately(model):
    full = generate(model, PROMPTS, max_new_tokens=20)
    stop = full[0][6]
    stopped = generate(model, PROMPTS, max_new_tokens=20, stop_ids=[stop])
    for f, s in zip(full, stopped):
        expected = f[: f.index(stop)] if stop in f else f
        assert s == expected
    assert stopped[0] == full[0][: full[0].index(stop)] and len(stopped[0]) <= 6


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    a = generate(model, PROMPTS, 15, temperature=1.0, top_p=0.95, seed=3)
    assert a == generate(model, PROMPTS, 15, temperature=1.0, top_p=0.95, seed=3)
    assert a != generate(model, PROMPTS, 15, temperature=1.0, top_p=0.95, seed=4)
    assert generate(model, PROMPTS, 15, temperature=0.7, top_p=1e-6) == generate(model, PROMPTS, 15)
    assert all(0 <= t < TINY.vocab_size for row in a for t in row)


def test_sample_next_distribution():
    """Frequencies match softmax(logits / T) cut to the top-p nucleus and renormalised."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 0.8, g), minlength=5).double() / 20000
    # nucleus for 0.8: 0.5 + 0.25 < 0.8, so 0.15 is included; 0.07 and 0.03 are cut
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0], dtype=torch.float64) / 0.9
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)
    counts_t = torch.bincount(sample_next(logits, 2.0, 1.0, g), minlength=5).double() / 20000
    tempered = torch.softmax(logits[0].double() / 2.0, -1)
    torch.testing.assert_close(counts_t, tempered, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[[1], []]), "every prompt needs at least one token"),
        (dict(prompts=[[1, 600]]), "prompt token 600 outside the vocabulary"),
        (
            dict(prompts=[[1]], max_new_tokens=300),
            "longest prompt 1 \\+ max_new_tokens 300 > ModelConfig.max_seq_len=256",
        ),
        (dict(prompts=[[1]], top_p=0.0), "top_p=0.0"),
        (dict(prompts=[[1]], temperature=-1.0), "temperature=-1.0"),
    ],
)
def test_bad_generation_input(model, kwargs, message):
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)
