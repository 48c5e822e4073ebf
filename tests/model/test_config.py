"""ModelConfig invariants, SIZES, parameter and FLOP counts."""

import dataclasses

import pytest
import torch

from model.llama import (
    SIZES,
    ModelConfig,
    RopeScaling,
    Transformer,
    config_from_dict,
    flops_per_token,
    matmul_params,
)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dim=60, n_heads=8), "ModelConfig.n_heads=8: must divide dim=60"),
        (dict(n_heads=4, n_kv_heads=3), "ModelConfig.n_kv_heads=3: must divide n_heads=4"),
        (dict(dim=60, n_heads=4, n_kv_heads=2), "ModelConfig.n_heads=4: gives an odd head dim 15"),
        (dict(dim=0), "ModelConfig.dim=0: must be a positive integer"),
        (dict(vocab_size=-5), "ModelConfig.vocab_size=-5: must be a positive integer"),
        (dict(max_seq_len=0), "ModelConfig.max_seq_len=0: must be a positive integer"),
        (dict(norm_eps=0.0), "ModelConfig.norm_eps=0.0: must be > 0"),
        (dict(rope_theta=-1.0), "ModelConfig.rope_theta=-1.0: must be > 0"),
        (
            dict(attention="flash2"),
            "ModelConfig.attention='flash2': must be one of auto, flash, sdpa, reference",
        ),
        (dict(kernels="triton"), "ModelConfig.kernels='triton': must be one of"),
        (dict(rope_scaling=RopeScaling(type="yarn")), "ModelConfig.rope_scaling.type='yarn': must be one of"),
        (
            dict(max_seq_len=512, rope_scaling=RopeScaling(original_max_seq_len=256)),
            "ModelConfig.max_seq_len=512: is longer than the RoPE context rope_scaling.original_max_seq_len=256",
        ),
        (
            dict(
                max_seq_len=2048,
                rope_scaling=RopeScaling(type="linear", factor=4.0, original_max_seq_len=256),
            ),
            "ModelConfig.max_seq_len=2048: is longer than the scaled RoPE context",
        ),
        (
            dict(rope_scaling=RopeScaling(type="linear", factor=4.0)),
            "ModelConfig.rope_scaling.original_max_seq_len=0: must be set for rope_scaling.type=linear",
        ),
        (
            dict(rope_scaling=RopeScaling(type="linear", factor=1.0, original_max_seq_len=64)),
            "ModelConfig.rope_scaling.factor=1.0: must be > 1",
        ),
        (
            dict(rope_scaling=RopeScaling(factor=2.0)),
            "ModelConfig.rope_scaling.factor=2.0: needs rope_scaling.type",
        ),
        (
            dict(rope_scaling=dict(type="llama3", factor=8.0, original_max_seq_len=64, low_freq_factor=4.0)),
            "ModelConfig.rope_scaling.low_freq_factor=4.0: must be > 0 and < rope_scaling.high_freq_factor=4.0",
        ),
    ],
)
def test_bad_config_names_field_and_value(changes, message):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(SIZES["tiny"], **changes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_scaled_rope_config_is_accepted_and_dict_converted():
    cfg = dataclasses.replace(
        SIZES["tiny"],
        max_seq_len=1024,
        rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 128},
    )
    assert cfg.rope_scaling == RopeScaling(type="llama3", factor=8.0, original_max_seq_len=128)


def test_every_size_is_valid_and_tiny_uses_gqa():
    for name, cfg in SIZES.items():
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0, name
        assert cfg.padded_vocab_size % cfg.vocab_multiple == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    tiny = SIZES["tiny"]
    assert tiny.n_kv_heads < tiny.n_heads


def test_lucie_8b_shape():
    c = SIZES["8b"]
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (
        32,
        4096,
        12288,
        32,
        8,
        65024,
    )


def _count_by_formula(cfg: ModelConfig) -> int:
    """Parameters written out by hand from the architecture (independent of matmul_params)."""
    D, Dh, V = cfg.dim, cfg.head_dim, cfg.padded_vocab_size
    per_layer = D * cfg.n_heads * Dh * 2 + D * cfg.n_kv_heads * Dh * 2 + 3 * D * cfg.ffn_dim + 2 * D
    return V * D * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * per_layer + D


@pytest.mark.parametrize("name", ["tiny", "125m"])
def test_num_params_matches_module_and_formula(name):
    cfg = SIZES[name]
    with torch.device("meta"):
        m = Transformer(cfg)
    counted = sum(p.numel() for p in m.parameters())  # a tied Parameter is yielded once
    assert m.num_params() == counted == _count_by_formula(cfg)


def test_size_parameter_counts():
    """The sizes are what their names say (tied embeddings counted once)."""
    expected = {
        "125m": 125_455_104,
        "350m": 349_750_272,
        "1b": 987_826_176,
        "8b": 6_706_958_336,
        "23b": 23_146_862_592,
    }
    for name, n in expected.items():
        assert _count_by_formula(SIZES[name]) == n, name


def test_flops_per_token():
    cfg = SIZES["tiny"]
    # N = everything but the input embedding, plus the head (untied here: all parameters but the embedding)
    n = _count_by_formula(cfg) - cfg.padded_vocab_size * cfg.dim
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, 256) == 6 * n + 12 * cfg.n_layers * cfg.dim * 256
    tied = SIZES["125m"]  # tied: the head matmul still counts, the lookup does not
    assert matmul_params(tied) == _count_by_formula(tied)


def test_config_from_dict_round_trip_and_unknown_field():
    cfg = dataclasses.replace(
        SIZES["tiny"], rope_scaling=RopeScaling(type="linear", factor=2.0, original_max_seq_len=128)
    )
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="ModelConfig: unknown field.*n_head\\b"):
        config_from_dict(dict(dataclasses.asdict(cfg), n_head=3))


def test_config_merges_as_an_omegaconf_structured_schema():
    """The train package merges recipe overrides into ModelConfig through omegaconf: nested RopeScaling
    included, and the invariants still run on the result."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(SIZES["tiny"])
    merged = OmegaConf.merge(
        schema, {"dim": 128, "rope_scaling": {"type": "linear", "factor": 2.0, "original_max_seq_len": 256}}
    )
    cfg = OmegaConf.to_object(merged)
    assert cfg == dataclasses.replace(SIZES["tiny"], dim=128, rope_scaling=RopeScaling("linear", 2.0, 256))
    with pytest.raises(ValueError, match="ModelConfig.n_heads=4: must divide dim=66"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"dim": 66}))
