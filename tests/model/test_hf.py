"""Parity with transformers' LlamaForCausalLM: same weights, same logits, same greedy tokens."""

import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.generate import generate
from model.hf import from_hf, hf_config, model_config_from_hf, to_hf
from model.llama import SIZES, RopeScaling, Transformer

TINY = SIZES["tiny"]
CASES = {
    "gqa": TINY,
    "tied": dataclasses.replace(TINY, tie_embeddings=True, vocab_size=500),  # padded to 512
    "llama3-rope": dataclasses.replace(
        TINY, max_seq_len=512, rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 64, 1.0, 4.0)
    ),
    "linear-rope": dataclasses.replace(TINY, rope_scaling=RopeScaling("linear", 2.0, 128)),
}


def hf_model(cfg) -> LlamaForCausalLM:
    d = hf_config(cfg, torch_dtype="float32")
    d.pop("architectures"), d.pop("model_type")
    return LlamaForCausalLM(LlamaConfig(**d)).eval()


def pair(cfg):
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    # wider weights than init_std so that logits spread out and greedy choices are not near-ties
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    theirs = hf_model(cfg)
    theirs.load_state_dict(to_hf(ours.state_dict(), cfg), strict=not cfg.tie_embeddings)
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_logits(case):
    cfg = CASES[case]
    ours, theirs = pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.shape == b.shape == (2, 200, cfg.padded_vocab_size)
    assert (a - b).abs().max().item() <= 1e-5
    if cfg.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()


def test_loss_equals_transformers_loss():
    ours, theirs = pair(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # transformers shifts labels itself; ours takes targets already shifted
        theirs_loss = theirs(ids, labels=ids).loss
        targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        ours_loss = ours(ids, targets=targets).loss
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers_generate():
    ours, theirs = pair(TINY)
    theirs.generation_config.eos_token_id = None  # run the full length, as ours without stop ids
    theirs.generation_config.pad_token_id = 0
    prompts = [[1, 17, 33, 92], [1, 5], [1, 400, 401, 402, 403, 404, 405, 406, 407]]
    ours_out = generate(ours, prompts, max_new_tokens=24)
    for prompt, got in zip(prompts, ours_out):
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
        assert got == want.tolist()


def test_round_trip_both_directions():
    for cfg in (TINY, CASES["tied"]):
        ours, theirs = pair(cfg)
        back = from_hf(to_hf(ours.state_dict(), cfg), cfg)
        assert back.keys() == ours.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
        hf_sd = theirs.state_dict()
        again = to_hf(from_hf(hf_sd, cfg), cfg)
        expected = {k for k in hf_sd if not (cfg.tie_embeddings and k == "lm_head.weight")}
        assert set(again) == expected and all(torch.equal(again[k], hf_sd[k]) for k in again)
        fresh = Transformer(cfg)
        fresh.load_state_dict(from_hf(hf_sd, cfg))  # strict


@pytest.mark.parametrize("case", list(CASES))
def test_hf_config_loads_in_transformers_and_back(case):
    cfg = CASES[case]
    d = hf_config(cfg, bos_token_id=1, eos_token_id=2)
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert d["vocab_size"] == cfg.padded_vocab_size and d["tie_word_embeddings"] == cfg.tie_embeddings
    hc = LlamaConfig(
        **{k: copy.deepcopy(v) for k, v in d.items() if k not in ("architectures", "model_type")}
    )
    assert hc.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hc.rope_parameters["rope_type"] == (
        "default" if cfg.rope_scaling.type == "none" else cfg.rope_scaling.type
    )
    back = model_config_from_hf(d)
    assert hf_config(back, bos_token_id=1, eos_token_id=2) == d
    assert dataclasses.replace(back, vocab_size=cfg.vocab_size, vocab_multiple=cfg.vocab_multiple) == cfg


def test_bad_state_dicts_and_configs_are_named():
    ours, theirs = pair(TINY)
    sd = ours.state_dict()
    with pytest.raises(ValueError, match="our state dict: missing key layers.1.attention.wqkv.weight"):
        to_hf({k: v for k, v in sd.items() if k != "layers.1.attention.wqkv.weight"}, TINY)
    with pytest.raises(
        ValueError,
        match=r"our state dict: layers.0.attention.wqkv.weight has shape \(64, 32\), the config needs \(128, 64\)",
    ):
        to_hf(dict(sd, **{"layers.0.attention.wqkv.weight": torch.zeros(64, 32)}), TINY)
    hf_sd = theirs.state_dict()
    with pytest.raises(
        ValueError, match="Hugging Face state dict: missing key model.layers.0.mlp.up_proj.weight"
    ):
        from_hf({k: v for k, v in hf_sd.items() if k != "model.layers.0.mlp.up_proj.weight"}, TINY)
    with pytest.raises(
        ValueError,
        match=r"Hugging Face state dict: model.layers.1.self_attn.k_proj.weight has shape \(64, 64\)",
    ):
        from_hf(dict(hf_sd, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}), TINY)
    with pytest.raises(ValueError, match="Hugging Face state dict: unexpected key model.extra"):
        from_hf(dict(theirs.state_dict(), **{"model.extra": torch.zeros(1)}), TINY)
    with pytest.raises(ValueError, match="config.json model_type='mistral'"):
        model_config_from_hf(dict(hf_config(TINY), model_type="mistral"))
    with pytest.raises(ValueError, match="config.json mlp_bias=true"):
        model_config_from_hf(dict(hf_config(TINY), mlp_bias=True))
