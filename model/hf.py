"""Conversion between our state dict / config and Hugging Face `LlamaForCausalLM`.

Weights need renaming, and our stacked matrices splitting (attention `wqkv` = q, k, v projections;
MLP `w13` = gate, up, stacked by rows), nothing else: our RoPE uses the same "rotate_half" layout as Hugging Face
Llama (the two halves of a head are rotated together), so q/k projections are stored as transformers
expects them. (Meta's original checkpoints use the interleaved layout; converting those needs the
permutation in transformers' convert_llama_weights_to_hf.py, which we never need.)

With tied embeddings the Hugging Face state dict has no `lm_head.weight` (transformers ties it on load
from `tie_word_embeddings`; safetensors refuses two names for one tensor).

The config's `vocab_size` is our padded vocabulary (the matrices' real row count); padded ids are
never produced by our tokenizer and never targets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.llama import ModelConfig, RopeScaling, config_from_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
COMMUNS_CONFIG = "communs.json"  # our ModelConfig (the exact one, fields HF has no name for) + provenance

_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _parts(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Each of our parameter names -> the Hugging Face parameters it holds, in row order, with their
    shapes. Our stacked matrices (`wqkv`, `w13`) hold several: their rows are the Hugging Face matrices
    one after the other (q, k, v; gate, up). output.weight is listed even when tied."""
    D, F_, V, Dh = cfg.dim, cfg.ffn_dim, cfg.padded_vocab_size, cfg.head_dim
    layer = {
        "attention.wqkv.weight": [
            ("self_attn.q_proj.weight", (cfg.n_heads * Dh, D)),
            ("self_attn.k_proj.weight", (cfg.n_kv_heads * Dh, D)),
            ("self_attn.v_proj.weight", (cfg.n_kv_heads * Dh, D)),
        ],
        "attention.wo.weight": [("self_attn.o_proj.weight", (D, cfg.n_heads * Dh))],
        "feed_forward.w13.weight": [("mlp.gate_proj.weight", (F_, D)), ("mlp.up_proj.weight", (F_, D))],
        "feed_forward.w2.weight": [("mlp.down_proj.weight", (D, F_))],
        "attention_norm.weight": [("input_layernorm.weight", (D,))],
        "ffn_norm.weight": [("post_attention_layernorm.weight", (D,))],
    }
    top = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    parts = {name: [(_TOP_NAMES[name], shape)] for name, shape in top.items()}
    for i in range(cfg.n_layers):
        for name, hf in layer.items():
            parts[f"layers.{i}.{name}"] = [(f"model.layers.{i}.{h}", shape) for h, shape in hf]
    return parts


def _stacked_shape(hf: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    """Our shape for a parameter holding the Hugging Face matrices `hf` stacked by rows."""
    shapes = [shape for _, shape in hf]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _check_keys(given: set[str], wanted: set[str], side: str) -> None:
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing:
        raise ValueError(f"{side} state dict: missing key {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{side} state dict: unexpected key {unexpected[0]} ({len(unexpected)} unexpected)")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], side: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{side} state dict: {name} has shape {tuple(t.shape)}, the config needs {shape}")


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (Transformer.state_dict()) -> Hugging Face LlamaForCausalLM names. Unstacked
    parameters are the same tensors; the parts of a stacked one (wqkv, w13) are copies (safetensors
    refuses tensors that share memory)."""
    parts = _parts(cfg)
    given = set(state_dict)
    if cfg.tie_embeddings:
        given.add("output.weight")  # optional on our side: it is the embedding
    _check_keys(given, set(parts), "our")
    out = {}
    for name, hf in parts.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        _check_shape(name, state_dict[name], _stacked_shape(hf), "our")
        if len(hf) == 1:
            out[hf[0][0]] = state_dict[name]
            continue
        pieces = state_dict[name].split([shape[0] for _, shape in hf], dim=0)
        out.update({hf_name: piece.clone() for (hf_name, _), piece in zip(hf, pieces)})
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM state dict -> ours, loadable with Transformer.load_state_dict
    (strict). With tied embeddings `lm_head.weight` may be absent; output.weight is then the embedding."""
    parts = _parts(cfg)
    given = {k for k in state_dict if not k.endswith("rotary_emb.inv_freq")}  # old transformers saved it
    wanted = {hf_name for hf in parts.values() for hf_name, _ in hf}
    if cfg.tie_embeddings:
        given.add("lm_head.weight")
    _check_keys(given, wanted, "Hugging Face")
    out = {}
    for name, hf in parts.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        for hf_name, shape in hf:
            _check_shape(hf_name, state_dict[hf_name], shape, "Hugging Face")
        tensors = [state_dict[hf_name] for hf_name, _ in hf]
        out[name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config(
    cfg: ModelConfig,
    torch_dtype: str = "bfloat16",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """config.json for transformers' LlamaForCausalLM (no custom code). RoPE is written both ways:
    `rope_theta` + `rope_scaling` (transformers 4.x, llama.cpp's converter) and `rope_parameters`
    (transformers 5)."""
    rs = cfg.rope_scaling
    scaling = None
    if rs.type == "linear":
        scaling = {"rope_type": "linear", "factor": rs.factor}
    elif rs.type == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_seq_len,
        }
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} | (scaling or {}),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    for key, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None:
            d[key] = value
    return d


def model_config_from_hf(d: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face Llama config.json dict (ours or another Llama's). The padded
    vocabulary is taken as the vocabulary (vocab_multiple 1). `overrides` (e.g. attention="sdpa") win."""
    if d.get("model_type") != "llama":
        raise ValueError(f"config.json model_type={d.get('model_type')!r}: only 'llama' converts")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"config.json {key}=true: biases are not part of this architecture")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={d['hidden_act']!r}: only silu (SwiGLU) converts")
    n_heads = d["num_attention_heads"]
    if d.get("head_dim") not in (None, d["hidden_size"] // n_heads):
        raise ValueError(f"config.json head_dim={d['head_dim']}: must be hidden_size / num_attention_heads")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_type == "default":
        scaling = RopeScaling()
    elif rope_type == "linear":
        factor = float(rope["factor"])
        original = rope.get("original_max_position_embeddings") or math.ceil(
            d["max_position_embeddings"] / factor
        )
        scaling = RopeScaling(type="linear", factor=factor, original_max_seq_len=int(original))
    elif rope_type == "llama3":
        scaling = RopeScaling(
            type="llama3",
            factor=float(rope["factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
        )
    else:
        raise ValueError(f"config.json rope type {rope_type!r}: only default, linear and llama3 convert")
    fields = dict(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"],
        vocab_size=d["vocab_size"],
        vocab_multiple=1,
        max_seq_len=d["max_position_embeddings"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------------------------------
# A Hugging Face Llama folder on disk (the weights and configs; the tokenizer files are the tokenizer's)


def save_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    stop_ids: list[int],
    dtype: torch.dtype = torch.float32,
    provenance: dict | None = None,
) -> None:
    """Write model.safetensors (HF names), config.json, generation_config.json and communs.json into the
    existing folder `out_dir`. `stop_ids` are generation_config's eos ids (end of text, end of turn)."""
    out_dir = Path(out_dir)
    hf_sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf(state_dict, cfg).items()}
    if cfg.tie_embeddings:
        # safetensors refuses shared storage; transformers re-ties lm_head from the embeddings.
        hf_sd.pop("lm_head.weight", None)
    save_file(hf_sd, out_dir / WEIGHTS, metadata={"format": "pt"})
    config = hf_config(cfg, torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=bos_id,
                       eos_token_id=eos_id, pad_token_id=pad_id)  # fmt: skip
    _write_json(out_dir / CONFIG, config)
    generation = {"bos_token_id": bos_id, "eos_token_id": sorted(set(stop_ids)), "pad_token_id": pad_id,
                  "do_sample": False}  # fmt: skip
    _write_json(out_dir / GENERATION_CONFIG, generation)
    meta = {"model_config": dataclasses.asdict(cfg), "provenance": provenance or {}}
    _write_json(out_dir / COMMUNS_CONFIG, meta)


def load_hf(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a folder written by `save_hf` back into our ModelConfig and state dict (safetensors only:
    nothing is unpickled). FileNotFoundError names a missing file; ValueError a bad config."""
    folder = Path(folder)
    for name in (COMMUNS_CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}")
    cfg = config_from_dict(json.loads((folder / COMMUNS_CONFIG).read_text())["model_config"])
    hf_sd = load_file(folder / WEIGHTS)
    if cfg.tie_embeddings and "lm_head.weight" not in hf_sd:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    return cfg, from_hf(hf_sd, cfg)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
