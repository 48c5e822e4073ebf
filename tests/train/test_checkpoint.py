"""Atomic commit, integrity check, resume scan and pruning of checkpoints (no DeepSpeed needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from common.errors import UserError
from train import checkpoint as ck


def fake_checkpoint(root, step, phase_end=False, recipe_hash="r", root_hash="m", payload=b"weights"):
    """What a save leaves: DeepSpeed's files in the temporary folder, then the commit."""
    tag = ck.tag_for(step)
    tmp = root / ck.prepare_tmp(root, tag)
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (tmp / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"adam" * 50)
    ck.save_rng(tmp, 0)
    client = {
        "step": step,
        "phase_end": phase_end,
        "recipe_hash": recipe_hash,
        "manifest_root_hash": root_hash,
    }
    return ck.commit(root, tag, client)


def test_commit_writes_integrity_and_latest(tmp_path):
    d = fake_checkpoint(tmp_path, 5)
    assert d.name == "step-00000005"
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    files = json.loads((d / "integrity.json").read_text())["files"]
    assert set(files) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "rng/rank-00000.pt", "client.json"}  # fmt: skip
    assert ck.verify(d) is None
    assert ck.read_client(d)["step"] == 5
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 700), "does not match its sha256"),
        (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10), "truncated"),
        (lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(), "is missing"),
        (lambda d: (d / "integrity.json").unlink(), "torn"),
    ],
)
def test_resume_skips_a_damaged_checkpoint_for_the_previous_one(tmp_path, damage, expected):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    damage(newest)
    messages = []
    point = ck.find_resume(tmp_path, "r", "m", "auto", log=messages.append)
    assert point.tag == "step-00000002"
    assert len(messages) == 1 and "step-00000004" in messages[0] and expected in messages[0]


def test_an_unfinished_write_is_never_resumed_from(tmp_path):
    fake_checkpoint(tmp_path, 2)
    tmp = tmp_path / ck.prepare_tmp(tmp_path, ck.tag_for(4))  # killed before the commit
    tmp.mkdir()
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ck.committed(tmp_path) == ["step-00000002"]
    assert ck.find_resume(tmp_path, "r", "m", "auto").tag == "step-00000002"
    ck.prune(tmp_path, keep_last=2, keep_phase_ends=True)
    assert not tmp.exists()


def test_resume_refuses_another_recipe_or_manifest_unless_forced(tmp_path):
    fake_checkpoint(tmp_path, 3)
    with pytest.raises(UserError, match=r"different recipe .*--resume force"):
        ck.find_resume(tmp_path, "other", "m", "auto")
    with pytest.raises(UserError, match=r"data manifest .*--resume force"):
        ck.find_resume(tmp_path, "r", "other", "auto")
    assert ck.find_resume(tmp_path, "other", "other", "force").tag == "step-00000003"
    with pytest.raises(UserError, match="--resume never"):
        ck.find_resume(tmp_path, "r", "m", "never")
    assert ck.find_resume(tmp_path / "empty", "r", "m", "never") is None
    assert ck.find_resume(tmp_path / "empty", "r", "m", "auto") is None


def test_prune_keeps_the_last_n_and_every_phase_end(tmp_path):
    for step, end in [(2, False), (4, True), (6, False), (8, False), (10, True), (12, False), (14, False)]:
        fake_checkpoint(tmp_path, step, phase_end=end)
        ck.prune(tmp_path, keep_last=2, keep_phase_ends=True)
    assert ck.committed(tmp_path) == ["step-00000014", "step-00000012", "step-00000010", "step-00000004"]
    ck.prune(tmp_path, keep_last=1, keep_phase_ends=False)
    assert ck.committed(tmp_path) == ["step-00000014"]


def test_recommitting_a_step_replaces_it(tmp_path):
    fake_checkpoint(tmp_path, 4, payload=b"old")
    d = fake_checkpoint(tmp_path, 4, payload=b"new")
    assert (d / "mp_rank_00_model_states.pt").read_bytes().startswith(b"new")
    assert ck.verify(d) is None and ck.committed(tmp_path) == ["step-00000004"]


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(3), random.random()
    ck.save_rng(tmp_path, 7)
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert ck.load_rng(tmp_path, 7)
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]
    assert not ck.load_rng(tmp_path, 8)  # no file for a rank the checkpoint did not have


def test_every_checkpoint_unusable_is_refused_unless_starting_fresh(tmp_path):
    (fake_checkpoint(tmp_path, 2) / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (fake_checkpoint(tmp_path, 4) / "integrity.json").unlink()
    for mode in ("auto", "force"):
        with pytest.raises(UserError) as e:
            ck.find_resume(tmp_path, "r", "m", mode, log=lambda msg: None)
        msg = str(e.value)
        assert "\n" not in msg and "no usable checkpoint" in msg and "--resume never" in msg
        assert (
            "step-00000004: no integrity.json (torn" in msg
            and "step-00000002: mp_rank_00_model_states.pt" in msg
        )
    messages = []
    assert (
        ck.find_resume(tmp_path, "r", "m", "never", log=messages.append) is None
    )  # a fresh start is allowed
    assert len(messages) == 1 and "every checkpoint is unusable" in messages[0]
    assert ck.set_aside_unusable(tmp_path) == ["unusable-step-00000004", "unusable-step-00000002"]
    assert ck.committed(tmp_path) == [] and not (tmp_path / "latest").exists()
    fake_checkpoint(tmp_path, 2)
    ck.prune(tmp_path, keep_last=1, keep_phase_ends=False)
    assert (tmp_path / "unusable-step-00000004").is_dir()  # kept for inspection, never scanned or pruned
    # a usable checkpoint among unusable ones: --resume never is refused, auto resumes from it
    with pytest.raises(UserError, match=r"has checkpoints \(step-00000002 ...\) and --resume never"):
        ck.find_resume(tmp_path, "r", "m", "never")
    assert ck.find_resume(tmp_path, "r", "m", "auto").tag == "step-00000002"


def test_a_recommit_cut_between_its_renames_is_found_restored_and_never_pruned(tmp_path):
    """Killed after moving the old step-4 aside and before renaming the new one in: step 4 exists only as
    `.tmp-old-step-00000004` (and the finished new copy as `.tmp-step-00000004`)."""
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, payload=b"old")
    (tmp_path / "step-00000004").rename(tmp_path / (ck.OLD_PREFIX + "step-00000004"))
    (tmp_path / ".tmp-step-00000004").mkdir()
    assert ck.committed(tmp_path) == ["step-00000004", "step-00000002"]
    point = ck.find_resume(tmp_path, "r", "m", "auto")
    assert point.tag == "step-00000004" and point.dir.name == ".tmp-old-step-00000004"
    ck.prune(tmp_path, keep_last=2, keep_phase_ends=True)  # only the unfinished .tmp-step-4 goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-old-step-00000004", "latest", "step-00000002"
    ]  # fmt: skip
    assert ck.restore(tmp_path, point.tag) == tmp_path / "step-00000004"
    assert ck.verify(tmp_path / "step-00000004") is None
    assert (tmp_path / "step-00000004" / "mp_rank_00_model_states.pt").read_bytes().startswith(b"old")
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    assert ck.committed(tmp_path) == ["step-00000004", "step-00000002"]

    # a damaged set-aside copy is skipped like any damaged checkpoint
    (tmp_path / "step-00000004").rename(tmp_path / (ck.OLD_PREFIX + "step-00000004"))
    (tmp_path / (ck.OLD_PREFIX + "step-00000004") / "integrity.json").unlink()
    assert ck.find_resume(tmp_path, "r", "m", "auto", log=lambda msg: None).tag == "step-00000002"

    # re-committing the step over such a leftover: the new copy wins, no leftover remains
    d = fake_checkpoint(tmp_path, 4, payload=b"new")
    assert (d / "mp_rank_00_model_states.pt").read_bytes().startswith(b"new") and ck.verify(d) is None
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in tmp_path.iterdir())
