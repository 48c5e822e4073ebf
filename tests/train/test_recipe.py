"""Recipes: schema, overrides, every bad input caught with one line naming file and key, derived values."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from train.recipe import (
    RecipeError,
    deepspeed_config,
    load_recipe,
    parse_count,
    plan_phases,
    recipe_hash,
    to_yaml,
    validate_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
# the world size each shipped recipe is written for (its batch must divide evenly)
WORLD = {"demo": 2, "gpu-125m": 1, "gpu-1b": 8, "lucie-8b": 256}


def one_line_error(path, overrides=(), world=2, files=True) -> str:
    with pytest.raises(RecipeError) as info:
        r = load_recipe(path, overrides)
        validate_inputs(r, world, str(path), check_files=files)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def edit(path: Path, tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    out = tmp_path / "edited.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_loads_and_validates(path):
    r = load_recipe(path)
    assert r.name == path.stem
    world = WORLD[r.name]
    validate_inputs(r, world, str(path), check_files=False)  # their data is prepared at run time
    plans = plan_phases(r, world)
    for p in plans:
        cfg = deepspeed_config(r, p.index, world)
        assert (
            cfg["train_batch_size"]
            == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
        )
        assert cfg["train_batch_size"] * p.phase.seq_len == p.phase.batch_tokens
    assert load_recipe(path) == r  # loading is deterministic
    assert yaml.safe_load(to_yaml(r))["phases"][0]["name"] == r.phases[0].name


def test_lucie_recipe_shape():
    r = load_recipe(ROOT / "recipes" / "lucie-8b.yaml")
    assert [p.kind for p in r.phases] == ["pretrain", "context-extension", "anneal", "sft"]
    assert r.precision == "bf16" and r.deepspeed.zero_stage in (1, 3)


def test_overrides_by_index_and_name_with_counts(tiny_recipe):
    r = load_recipe(
        tiny_recipe, ["phases.first.tokens=4K", "phases.1.seq_len=32", "seed=7", "phases.second.lr.peak=1e-3"]
    )
    assert (r.phases[0].tokens, r.phases[1].seq_len, r.seed, r.phases[1].lr.peak) == (4000, 32, 7, 1e-3)
    assert (
        parse_count("2.5M") == 2_500_000 and parse_count("3T") == 3 * 10**12 and parse_count("1e6") == 10**6
    )
    assert parse_count("1.5") is None and parse_count("ten") is None


def test_unknown_key_in_the_file_has_a_suggestion(tiny_recipe, tmp_path):
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][0].update(seq_lenght=64))
    msg = one_line_error(bad)
    assert msg.endswith("phases[0].seq_lenght: unknown key (did you mean 'seq_len'?)")


def test_unknown_key_in_an_override_names_the_override(tiny_recipe):
    msg = one_line_error(tiny_recipe, ["deepspeed.zero_stag=3"])
    assert "override 'deepspeed.zero_stag=3'" in msg and "did you mean 'zero_stage'?" in msg


def test_unknown_phase_in_an_override(tiny_recipe):
    assert "no phase 'frist'" in one_line_error(tiny_recipe, ["phases.frist.tokens=1"])


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("phases.0.tokens=lots", "phases[0].tokens", "expected an integer"),
        ("seed=1.5", "seed", "expected an integer"),
        ("phases.0.allow_repeat=maybe", "phases[0].allow_repeat", "expected true or false"),
        ("phases.0.lr.peak=high", "phases[0].lr.peak", "expected a number"),
        ("phases.0.mixture=[fr]", "phases[0].mixture", "expected a mapping"),
        ("precision=fp8", "precision", "not one of fp32, bf16, fp16"),
        ("phases.0.kind=pretraining", "phases[0].kind", "did you mean 'pretrain'"),
        ("model.size=huge", "model.size", "is not one of"),
        ("model.overrides.n_heads=3", "model.overrides", "must divide dim"),
        ("deepspeed.offload_params=true", "deepspeed.offload_params", "zero_stage: 3"),
        ("phases.1.lr.start=continue", "phases[1].lr.peak", "remove peak"),
    ],
)
def test_wrong_types_and_values(tiny_recipe, override, key, words):
    msg = one_line_error(tiny_recipe, [override], files=False)
    assert f": {key}: " in msg and words in msg


def test_missing_required_key(tiny_recipe, tmp_path):
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][1].pop("seq_len"))
    assert one_line_error(bad, files=False).endswith("phases[1].seq_len: missing (required)")


def test_weights_must_be_positive(tiny_recipe):
    for w in ("0", "-0.5"):
        msg = one_line_error(tiny_recipe, [f"phases.first.mixture.en={w}"], files=False)
        assert "phases[0].mixture.en: weight" in msg and "must be a positive number" in msg


def test_missing_manifest_and_tokenizer(tiny_recipe, tmp_path):
    msg = one_line_error(tiny_recipe, [f"data.manifest={tmp_path / 'nope.json'}"])
    assert "data.manifest" in msg and "file not found" in msg
    msg = one_line_error(tiny_recipe, [f"tokenizer.path={tmp_path / 'nope.model'}"])
    assert "tokenizer.path" in msg and "file not found" in msg


def test_fp16_needs_a_gpu(tiny_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert one_line_error(tiny_recipe, ["precision=fp16"]).endswith(
        "precision: fp16 needs a CUDA GPU (DeepSpeed on CPU trains in fp32 or bf16)"
    )


def test_vocab_mismatch(tiny_recipe):
    msg = one_line_error(tiny_recipe, ["model.overrides.vocab_size=600"])
    assert "model.overrides.vocab_size: model vocab_size 600 != tokenizer vocab_size 512" in msg


def test_mixture_source_absent_from_the_manifest(tiny_recipe, tmp_path):
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][0]["mixture"].update(ferns=0.1))
    msg = one_line_error(bad)
    assert "phases[0].mixture.ferns: not a source of" in msg and "(did you mean 'en'?)" not in msg
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][1].update(mixture={"chatt": 1.0}))
    assert "(did you mean 'chat'?)" in one_line_error(bad)


def test_sft_needs_chat_sources_and_usage_conditions_are_kept(tiny_recipe, tmp_path):
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][1]["mixture"].update(fr=0.5))
    msg = one_line_error(bad)
    assert "phases[1].mixture.fr" in msg and "allow phases of kind" in msg
    bad = edit(tiny_recipe, tmp_path, lambda r: r["phases"][0]["mixture"].update(chat=0.5))
    assert "usage conditions of 'chat'" in one_line_error(bad)


def test_token_budget_larger_than_the_data(tiny_recipe, dataset):
    msg = one_line_error(tiny_recipe, ["phases.first.tokens=1M"])
    assert "phases[0].tokens: 1,000,000 tokens need" in msg and "allow_repeat: true" in msg
    r = load_recipe(tiny_recipe, ["phases.first.tokens=1M", "phases.first.allow_repeat=true"])
    validate_inputs(r, 2, str(tiny_recipe))


def test_batch_not_divisible_by_world_size_times_micro_batch(tiny_recipe):
    msg = one_line_error(tiny_recipe, [], world=3)
    assert "phases[0].batch_tokens: 256 is not divisible by world size x micro_batch_size x seq_len" in msg
    msg = one_line_error(tiny_recipe, ["phases.second.micro_batch_size=4"], world=2)
    assert "phases[1].batch_tokens" in msg and "2 x 4 x 128 = 1024" in msg


def test_derived_values_and_learning_rates(tiny_recipe):
    r = load_recipe(tiny_recipe)
    first, second = plan_phases(r, 2)
    assert (first.seqs_per_step, first.grad_accum, first.steps, first.warmup_steps) == (4, 1, 8, 2)
    assert (second.first_step, second.end_step, second.tokens, second.seqs_per_step) == (8, 11, 3 * 512, 4)
    # the second phase trains the same weights with longer sequences and another RoPE base
    assert (first.model_cfg.rope_theta, second.model_cfg.rope_theta) == (10000.0, 40000.0)
    assert dataclasses.replace(
        second.model_cfg, rope_theta=10000.0, max_seq_len=first.model_cfg.max_seq_len
    ) == (first.model_cfg)
    assert second.model_cfg.max_seq_len >= 128
    # wsd: warmup 2 steps, stable, the last 25% (2 steps) decay linearly to 10% of the peak
    assert [first.lr_at(i) for i in range(8)] == pytest.approx(
        [1.5e-3, 3e-3, 3e-3, 3e-3, 3e-3, 3e-3, 3e-3 + (3e-4 - 3e-3) / 2, 3e-4]
    )
    # cosine from 2e-3 to 2e-4 over 3 steps
    assert [second.lr_at(i) for i in range(3)] == pytest.approx(
        [2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * i / 2)) for i in range(3)]
    )
    r2 = load_recipe(tiny_recipe, ["phases.second.lr.start=continue", "phases.second.lr.peak=null",
                                   "phases.second.lr.schedule=linear"])  # fmt: skip
    cont = plan_phases(r2, 2)[1]
    assert cont.peak_lr == pytest.approx(3e-4) and cont.lr_at(0) == pytest.approx(3e-4)
    assert cont.lr_at(2) == pytest.approx(3e-5)


def test_recipe_hash_ignores_paths_and_logging_only(tiny_recipe):
    base = recipe_hash(load_recipe(tiny_recipe))
    assert recipe_hash(load_recipe(tiny_recipe, ["logging.interval=7", "checkpoint.interval=5"])) == base
    assert recipe_hash(load_recipe(tiny_recipe, ["phases.first.lr.peak=1e-3"])) != base
    assert recipe_hash(load_recipe(tiny_recipe, ["deepspeed.zero_stage=3"])) != base


def test_deepspeed_config_is_generated_from_the_recipe(tiny_recipe):
    r = load_recipe(tiny_recipe, ["deepspeed.zero_stage=3", "precision=bf16", "optimizer.grad_clip=0.5"])
    cfg = deepspeed_config(r, "second", 2)
    assert cfg["train_batch_size"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["optimizer"]["params"]["lr"] == 2e-3
