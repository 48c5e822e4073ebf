"""The loop in this process (rank 0 of a 1-process gloo group): run directory, telemetry, exports,
non-finite steps; and the `communs train` command's validation before anything starts."""

from __future__ import annotations

import json

import pytest
import torch

from communs import main as communs_main
from model.llama import Transformer
from train import EXIT_OK, loop
from train.recipe import deepspeed_config, load_recipe


def records(run_dir, kind="train"):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def test_two_phases_in_one_process(tiny_recipe, single_rank, tmp_path):
    recipe = load_recipe(tiny_recipe)
    run_dir = tmp_path / "run"
    assert loop.run(recipe, run_dir) == EXIT_OK

    train = records(run_dir)
    assert sorted(train) == list(range(1, 15))  # logging.interval 1: every step
    assert [train[s]["phase"] for s in (1, 8, 9, 14)] == ["first", "first", "second", "second"]
    assert train[8]["tokens"] == 8 * 256 and train[14]["phase_tokens"] == 6 * 256
    assert train[8]["loss"] < train[1]["loss"] - 0.3  # it learns
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in train.values())
    assert train[1]["lr"] == pytest.approx(1.5e-3) and train[9]["lr"] == pytest.approx(2e-3)
    val = records(run_dir, "val")
    assert (
        set(val) == {8, 14} and set(val[8]["losses"]) == {"fr", "en"} and set(val[14]["losses"]) == {"chat"}
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["first", "second"]
    assert (
        summary["phases"][0]["loss_start"] == train[1]["loss"]
        and summary["phases"][1]["loss_end"] == train[14]["loss"]
    )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["manifest_root_hash"] and run["world_size"] == 1
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "commit" in env["git"] and "dirty" in env["git"]
    assert json.loads((run_dir / "deepspeed" / "second.json").read_text()) == deepspeed_config(recipe, 1, 1)
    assert load_recipe(run_dir / "recipe.yaml") == recipe  # the resolved recipe reloads to the same

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    # every 2 steps, the last 2 periodic ones kept (10, 12) and the phase ends (8, 14)
    assert ckpts == ["step-00000008", "step-00000010", "step-00000012", "step-00000014"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000014"

    # the exported weights are the consolidated checkpoint, and they give the logged validation loss
    from safetensors.torch import load_file

    for phase in ("first", "second"):
        assert (run_dir / "export" / phase / "config.json").exists()
    weights = load_file(run_dir / "export" / "second" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    sd = loop.consolidated_state_dict(run_dir / "checkpoints", "step-00000014", 1)
    assert torch.equal(weights["model.embed_tokens.weight"], sd["tok_embeddings.weight"])
    plans = __import__("train.recipe", fromlist=["plan_phases"]).plan_phases(recipe, 1)
    model = Transformer(plans[1].model_cfg)
    model.load_state_dict(sd)
    assert model.num_params() > 0


@pytest.mark.parametrize("stage", [0, 1])
def test_non_finite_steps_are_skipped_then_the_run_aborts(
    tiny_recipe, single_rank, tmp_path, monkeypatch, stage
):
    recipe = load_recipe(tiny_recipe, [f"deepspeed.zero_stage={stage}", "stability.max_bad_steps=3"])
    forward = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            step = (calls["n"] - 1) // 2 + 1  # 2 micro-batches per step
            if step == 3 or step >= 6:  # step 3 alone, then steps 6, 7, 8 in a row
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(loop.TrainingAborted, match=r"step 8: 3 steps in a row with a non-finite loss"):
        loop.run(recipe, run_dir)
    train = records(run_dir)
    assert [train[s]["skipped_total"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert all(train[s]["loss"] == train[s]["loss"] for s in (1, 2, 4, 5))  # finite
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_the_command_refuses_a_bad_recipe_before_writing_anything(tiny_recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = communs_main(["train", str(tiny_recipe), "phases.first.tokns=1", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "phases[0].tokns: unknown key (did you mean 'tokens'?)" in err
    assert not run_dir.exists()


def test_dry_run_writes_the_run_directory(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    assert (
        communs_main(["train", str(tiny_recipe), "--run-dir", str(run_dir), "--nproc", "2", "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "phase first" in out and "8 steps" in out
    assert {p.name for p in run_dir.iterdir()} >= {"recipe.yaml", "deepspeed", "env.json", "run.json", "logs"}
    assert json.loads((run_dir / "deepspeed" / "first.json").read_text())["gradient_accumulation_steps"] == 1


def test_zero0_export_is_the_module_read_without_unpickling(tiny_recipe, single_rank, tmp_path):
    recipe = load_recipe(tiny_recipe, ["deepspeed.zero_stage=0"])
    run_dir = tmp_path / "run"
    assert loop.run(recipe, run_dir) == EXIT_OK
    from safetensors.torch import load_file

    sd = loop.consolidated_state_dict(run_dir / "checkpoints", "step-00000014", 0)  # weights_only=True
    weights = load_file(run_dir / "export" / "second" / "model.safetensors")
    assert torch.equal(weights["model.norm.weight"], sd["norm.weight"])
    assert torch.equal(weights["model.embed_tokens.weight"], sd["tok_embeddings.weight"])
