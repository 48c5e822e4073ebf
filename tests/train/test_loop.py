"""The loop in this process (rank 0 of a 1-process gloo group): run directory, telemetry, exports,
non-finite steps; and the `communs train` command's validation before anything starts."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch

from communs import main as communs_main
from model.llama import Transformer
from train import EXIT_OK, EXIT_REQUEUE, loop, telemetry
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
    assert sorted(train) == list(range(1, 12))  # logging.interval 1: every step
    assert [train[s]["phase"] for s in (1, 8, 9, 11)] == ["first", "first", "second", "second"]
    assert train[8]["tokens"] == 8 * 256 and train[11]["tokens"] == 8 * 256 + 3 * 512
    assert train[11]["phase_tokens"] == 3 * 512
    assert train[8]["loss"] < train[1]["loss"] - 0.3  # it learns
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in train.values())
    assert train[1]["lr"] == pytest.approx(1.5e-3) and train[9]["lr"] == pytest.approx(2e-3)
    val = records(run_dir, "val")
    assert (
        set(val) == {8, 11} and set(val[8]["losses"]) == {"fr", "en"} and set(val[11]["losses"]) == {"chat"}
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["first", "second"]
    assert (
        summary["phases"][0]["loss_start"] == train[1]["loss"]
        and summary["phases"][1]["loss_end"] == train[11]["loss"]
    )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["manifest_root_hash"] and run["world_size"] == 1
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "commit" in env["git"] and "dirty" in env["git"]
    assert json.loads((run_dir / "deepspeed" / "second.json").read_text()) == deepspeed_config(recipe, 1, 1)
    assert load_recipe(run_dir / "recipe.yaml") == recipe  # the resolved recipe reloads to the same

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    # every 2 steps, the last 2 periodic ones kept (6, 10) and the phase ends (8, 11)
    assert ckpts == ["step-00000006", "step-00000008", "step-00000010", "step-00000011"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000011"

    # the exported weights are the consolidated checkpoint, and they give the logged validation loss
    from safetensors.torch import load_file

    for phase in ("first", "second"):
        assert (run_dir / "export" / phase / "config.json").exists()
    weights = load_file(run_dir / "export" / "second" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    sd = loop.consolidated_state_dict(run_dir / "checkpoints", "step-00000011", 1)
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


def test_zero0_lr_continued_across_phases_resumed_at_the_boundary_and_exported(
    tiny_recipe, single_rank, tmp_path
):
    """ZeRO 0, the second phase's lr continuing the first's, a stop at the phase boundary and a resume:
    the lr goes on where it was, env.json is kept (the resume gets env-1.json), and the export is the
    module of the checkpoint, read without unpickling."""
    recipe = load_recipe(
        tiny_recipe,
        ["deepspeed.zero_stage=0", "phases.second.lr.start=continue", "phases.second.lr.peak=null"],
    )
    run_dir = tmp_path / "run"
    assert loop.run(recipe, run_dir, stop_at_step=8) == EXIT_REQUEUE  # at the phase boundary
    first_env = (run_dir / "env.json").read_text()
    assert loop.run(recipe, run_dir) == EXIT_OK
    train = records(run_dir)
    # phase 1 (wsd) ends at peak x min_ratio; phase 2 (cosine, no warmup) starts there and decays to 10 %
    assert train[8]["lr"] == pytest.approx(3e-4) and train[9]["lr"] == train[8]["lr"]
    assert train[11]["lr"] == pytest.approx(3e-5)
    assert (run_dir / "env.json").read_text() == first_env  # the first start's environment, kept
    resumed = json.loads((run_dir / "env-1.json").read_text())
    assert resumed["resumed_from"] == "step-00000008" and resumed["torch"] == torch.__version__
    assert not (run_dir / "env-2.json").exists()

    from safetensors.torch import load_file

    sd = loop.consolidated_state_dict(run_dir / "checkpoints", "step-00000011", 0)  # weights_only=True
    weights = load_file(run_dir / "export" / "second" / "model.safetensors")
    assert torch.equal(weights["model.norm.weight"], sd["norm.weight"])
    assert torch.equal(weights["model.embed_tokens.weight"], sd["tok_embeddings.weight"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_during_start_up_stops_cleanly_before_the_first_step(
    tiny_recipe, single_rank, tmp_path, monkeypatch, sig
):
    """A signal while the rank starts (here: while it measures the FLOP/s) does not kill it: it exits
    EXIT_REQUEUE, status `preempted`, nothing trained, no checkpoint written."""
    real = telemetry.peak_flops

    def signalled(*args):
        os.kill(os.getpid(), sig)
        return real(*args)

    monkeypatch.setattr(telemetry, "peak_flops", signalled)
    before = signal.getsignal(sig)
    run_dir = tmp_path / "run"
    assert loop.run(load_recipe(tiny_recipe), run_dir) == EXIT_REQUEUE
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "preempted" and run["step"] == 0
    assert not (run_dir / "checkpoints").exists() and records(run_dir) == {}
    assert signal.getsignal(sig) == before  # the handlers are put back


def test_a_global_batch_with_nothing_scored_is_a_skipped_step(
    tiny_recipe, single_rank, tmp_path, monkeypatch
):
    real = loop.rank_micro_batches
    calls = {"n": 0}

    def unscored_third_step(*args):
        batches = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:  # every target of the global batch unscored (an SFT batch of user turns)
            batches = [
                loop.MicroBatch(mb.input_ids, mb.position_ids, torch.full_like(mb.targets, loop.IGNORE_INDEX), 0)
                for mb in batches
            ]
        return batches

    monkeypatch.setattr(loop, "rank_micro_batches", unscored_third_step)
    snapshots = []
    real_step = loop.train_step

    def recording_step(engine, *args):
        result = real_step(engine, *args)
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()]))
        return result

    monkeypatch.setattr(loop, "train_step", recording_step)
    run_dir = tmp_path / "run"
    assert loop.run(load_recipe(tiny_recipe), run_dir, stop_at_step=4) == EXIT_REQUEUE
    train = records(run_dir)
    assert [train[s]["skipped_total"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert math.isnan(train[3]["loss"]) and math.isnan(train[3]["grad_norm"])
    assert math.isfinite(train[4]["loss"]) and train[4]["grad_norm"] > 0
    assert torch.equal(snapshots[2], snapshots[1]) and not torch.equal(snapshots[3], snapshots[2])
    client = json.loads((run_dir / "checkpoints" / "step-00000004" / "client.json").read_text())
    assert client["skipped_total"] == 1 and client["bad_in_a_row"] == 0  # not a non-finite streak


def test_a_line_cut_by_kill_9_is_dropped_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = json.dumps({"kind": "train", "step": 1}) + "\n"
    path.write_text(whole + '{"kind": "train", "st')  # the writer was killed in the middle of a line
    with telemetry.open_metrics(path) as f:
        f.write(json.dumps({"kind": "train", "step": 2}) + "\n")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"kind": "tra')  # no complete line at all
    telemetry.open_metrics(path).close()
    assert path.read_text() == ""
    path.write_text(whole)  # a whole file is left alone
    telemetry.open_metrics(path).close()
    assert path.read_text() == whole


def test_wandb_offline_run_is_written_in_the_run_directory(tiny_recipe, single_rank, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    recipe = load_recipe(tiny_recipe, ["logging.wandb_project=communs-test"])
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    assert loop.run(recipe, run_dir, stop_at_step=1) == EXIT_REQUEUE
    assert time.perf_counter() - start < 90  # no network wait
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(wandb_id)
    assert any(runs[0].glob("*.wandb"))  # the offline log that `wandb sync` uploads


def test_the_command_refuses_a_resume_with_another_world_size_before_launching(
    tiny_recipe, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("RANK", raising=False)
    from train import checkpoint
    from train.recipe import recipe_hash, validate_inputs

    recipe = load_recipe(tiny_recipe)
    root_hash = validate_inputs(recipe, 1)["root_hash"]
    ckpts = tmp_path / "run" / "checkpoints"
    tmp = ckpts / checkpoint.prepare_tmp(ckpts, "step-00000002")
    tmp.mkdir()
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"w")
    checkpoint.commit(ckpts, "step-00000002", {"step": 2, "recipe_hash": recipe_hash(recipe),
                                               "manifest_root_hash": root_hash, "world_size": 2})  # fmt: skip
    rc = communs_main(["train", str(tiny_recipe), "--run-dir", str(tmp_path / "run"), "--nproc", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "step-00000002: written by 2 ranks, this run has 1" in err and "resume with --nproc 2" in err
    assert not (tmp_path / "run" / "logs").exists()  # refused before writing or launching anything


def test_torchrun_passes_every_stop_signal_on_and_waits_for_the_checkpoint():
    from train.cli import torchrun_command

    cmd = torchrun_command(2, timeout_minutes=30)
    handled = cmd[cmd.index("--signals-to-handle") + 1].split(",")
    assert {"SIGTERM", "SIGUSR1", "SIGINT"} <= set(handled)
    assert int(cmd[cmd.index("--shutdown-timeout") + 1]) == 30 * 60 + 600  # not torchrun's 30 s


def test_micro_batches_mixing_sources_hold_each_window_in_its_slot(tmp_path):
    # A micro-batch drawn from two sources is one batch() call per source, its rows put back in slot order.
    import numpy as np

    from corpus.loader import PackedReader
    from corpus.shards import write_shard

    rng = np.random.default_rng(0)
    readers = {}
    for src, with_mask in (("text", False), ("chat", True)):
        docs = []
        for _ in range(20):
            t = rng.integers(6, 500, int(rng.integers(5, 60))).astype(np.uint32)
            docs.append((t, rng.integers(0, 2, len(t)).astype(np.uint8)) if with_mask else t)
        write_shard(tmp_path / src, docs)
        readers[src] = PackedReader([tmp_path / src], 16)
    picks = [("chat", 3), ("text", 0), ("text", 7), ("chat", 3), ("chat", 1), ("text", 2)]
    tokens, positions, scored = loop.gather_windows(readers, picks)
    for row, (src, w) in enumerate(picks):
        for got, want in zip((tokens, positions, scored), readers[src][w]):
            np.testing.assert_array_equal(got[row], want)
    one = loop.gather_windows(readers, [("text", 5), ("text", 1)])  # one source: its batch as it is
    for got, want in zip(one, readers["text"].batch([5, 1])):
        np.testing.assert_array_equal(got, want)
    mb = loop.make_batch(tokens, positions, scored, torch.device("cpu"))
    assert mb.n_scored == int(scored.sum()) and mb.input_ids.shape == (6, 16)
    expected = np.where(scored, tokens[:, 1:], loop.IGNORE_INDEX)
    np.testing.assert_array_equal(mb.targets.numpy(), expected)
    np.testing.assert_array_equal(mb.input_ids.numpy(), tokens[:, :-1])
