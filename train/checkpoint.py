"""Checkpoints committed atomically, checked on resume, pruned; the RNG state of every rank.

    RUN/checkpoints/step-00000120/        a committed checkpoint (120 optimizer steps done)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's own files
        rng/rank-00000.pt                 torch / numpy / python RNG state of each rank (tensors only)
        client.json                       phase, steps, tokens, data position, recipe and manifest hashes
        integrity.json                    sha256 and size of every file above; written last
    RUN/checkpoints/latest                the newest committed tag, replaced with os.replace
    RUN/checkpoints/.tmp-step-00000120/   a checkpoint being written (never read; removed on the next save)
    RUN/checkpoints/.tmp-old-step-00000120/  a committed checkpoint being replaced by a re-save of its step

Commit protocol: every rank writes into the `.tmp-` folder (DeepSpeed's save_checkpoint, then its RNG
file), a barrier, then rank 0 writes client.json, hashes every file into integrity.json, fsyncs, and
renames the folder to its final name (atomic on a POSIX filesystem), then replaces `latest`. A crash
at any point leaves either the previous checkpoints untouched or a complete new one. A committed
checkpoint whose files no longer match integrity.json (torn copy, bit rot, truncation) is reported
and skipped on resume for the previous good one; when every checkpoint is unusable, resuming is refused
(each one named with its problem) unless the run is restarted fresh (`--resume never`).

Re-saving a step that is already committed (a resumed run redoing it) moves the old folder to
`.tmp-old-<tag>`, renames the new one into place, then deletes the old one. A POSIX rename cannot
replace a non-empty folder, so between the two renames the tag exists only as `.tmp-old-<tag>`: the
scan counts such a folder as the committed `<tag>` while `<tag>` itself is absent (`restore` renames it
back before it is loaded), and prune never deletes it as a temporary folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.io import sha256_file, write_atomic

FORMAT = "communs.checkpoint/1"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = TMP_PREFIX + "old-"  # a committed checkpoint set aside while its step is re-committed
UNUSABLE_PREFIX = "unusable-"  # unusable checkpoints set aside by a fresh start (--resume never)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("-", 1)[1])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# RNG state of one rank


def save_rng(ckpt_dir: Path, rank: int) -> None:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": None if py_state[2] is None else float(py_state[2])},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    path = ckpt_dir / "rng" / f"rank-{rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (other world size)."""
    path = ckpt_dir / "rng" / f"rank-{rank:05d}.pt"
    if not path.exists():
        return False
    state = torch.load(path, weights_only=True)  # tensors, ints and lists only: nothing is unpickled
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


# ----------------------------------------------------------------------------------------------------
# Commit, scan, verify, prune


def prepare_tmp(root: Path, tag: str) -> str:
    """Rank 0, before DeepSpeed writes: remove a leftover temporary folder of the same tag; return its name."""
    tmp = TMP_PREFIX + tag
    if (root / tmp).exists():
        shutil.rmtree(root / tmp)
    root.mkdir(parents=True, exist_ok=True)
    return tmp


def _files(ckpt_dir: Path) -> list[str]:
    return sorted(p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*") if p.is_file())


def hash_share(
    ckpt_dir: Path, rank: int = 0, world: int = 1, exclude: tuple[str, ...] = ()
) -> dict[str, dict]:
    """fsync and hash this rank's share of the folder's files (every world-th file, sorted by path): the
    ranks of a job hash a large checkpoint in parallel, each reading 1/world of it."""
    out = {}
    for rel in _files(ckpt_dir)[rank::world]:
        if rel in exclude:
            continue
        path = ckpt_dir / rel
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def commit(root: Path, tag: str, client: dict, hashes: dict[str, dict] | None = None) -> Path:
    """Rank 0, after every rank wrote into `.tmp-<tag>`: client.json, integrity.json, rename, `latest`.

    `hashes`: the data files' records from hash_share on every rank, merged (None: hash them here)."""
    tmp_dir = root / (TMP_PREFIX + tag)
    client = {"format": FORMAT, "tag": tag, **client}
    (tmp_dir / "client.json").write_text(json.dumps(client, indent=1, sort_keys=True) + "\n")
    files = dict(hashes) if hashes is not None else hash_share(tmp_dir, exclude=("client.json",))
    files.update(hash_share(tmp_dir, exclude=tuple(r for r in _files(tmp_dir) if r != "client.json")))
    missing = set(_files(tmp_dir)) - set(files)
    if missing:
        raise RuntimeError(f"{tmp_dir}: files not hashed: {sorted(missing)}")
    write_atomic(
        tmp_dir / "integrity.json",
        json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n",
        fsync=True,
    )
    _fsync_dir(tmp_dir)
    final = root / tag
    old = root / (OLD_PREFIX + tag)
    if final.exists():  # the same step saved again (a resumed run redoing it): the new one replaces it
        if old.exists():  # a leftover of an earlier interrupted swap; `final` is the newer copy
            shutil.rmtree(old)
        # the old copy stays whole under .tmp-old-<tag> (still found by the scan) until the new one is in place
        os.replace(final, old)
        _fsync_dir(root)
    os.replace(tmp_dir, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(root)
    write_atomic(root / "latest", tag + "\n", fsync=True)
    return final


def _is_tag(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def committed(root: Path) -> list[str]:
    """Committed checkpoint tags, newest first (by step); a tag whose folder is absent but set aside as
    `.tmp-old-<tag>` (a re-commit of its step cut between its two renames) counts: see `location`."""
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if p.is_dir()}
    tags = {n for n in names if _is_tag(n)}
    tags |= {
        n[len(OLD_PREFIX) :] for n in names if n.startswith(OLD_PREFIX) and _is_tag(n[len(OLD_PREFIX) :])
    }
    return sorted(tags, key=step_of, reverse=True)


def location(root: Path, tag: str) -> Path:
    """The folder holding committed `tag`: RUN/checkpoints/<tag>, or `.tmp-old-<tag>` when only that is left."""
    final = root / tag
    return final if final.is_dir() or not (root / (OLD_PREFIX + tag)).is_dir() else root / (OLD_PREFIX + tag)


def restore(root: Path, tag: str) -> Path:
    """Rank 0, before loading `tag`: rename a set-aside `.tmp-old-<tag>` back to `<tag>` (and `latest`)."""
    where = location(root, tag)
    if where.name != tag:
        os.replace(where, root / tag)
        _fsync_dir(root)
        write_atomic(root / "latest", tag + "\n", fsync=True)
    return root / tag


def verify(ckpt_dir: Path, rank: int = 0, world: int = 1) -> str | None:
    """None when every file matches integrity.json; else what is wrong, in a few words. With rank/world,
    only that rank's share of the files is hashed (the ranks of a job verify in parallel)."""
    record = ckpt_dir / "integrity.json"
    if not record.exists():
        return "no integrity.json (torn: the write never finished)"
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"integrity.json unreadable ({e})"
    for rel in sorted(files)[rank::world]:
        meta = files[rel]
        path = ckpt_dir / rel
        if not path.exists():
            return f"{rel} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {meta['bytes']} (truncated?)"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


def read_client(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "client.json").read_text())


def prune(root: Path, keep_last: int, keep_phase_ends: bool, current_tmp: str | None = None) -> list[str]:
    """Delete periodic checkpoints beyond the newest `keep_last` (phase ends kept apart) and stale
    temporary folders; return the deleted names. The newest checkpoint is never deleted."""
    tags = committed(root)
    periodic = []
    for tag in tags:
        try:
            phase_end = read_client(location(root, tag)).get("phase_end", False)
        except (OSError, ValueError):
            phase_end = False
        if not (phase_end and keep_phase_ends):
            periodic.append(tag)
    doomed = [location(root, t).name for t in periodic[keep_last:] if t != tags[0]]
    # temporary folders, except a set-aside `.tmp-old-<tag>` that is the only copy of its tag
    doomed += [
        p.name
        for p in root.iterdir()
        if p.name.startswith(TMP_PREFIX)
        and p.name != current_tmp
        and p.name not in doomed
        and not (p.name.startswith(OLD_PREFIX) and location(root, p.name[len(OLD_PREFIX) :]) == p)
    ]
    for name in doomed:
        shutil.rmtree(root / name, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------------
# Resume


@dataclass
class ResumePoint:
    tag: str
    dir: Path
    client: dict


def find_resume(
    root: Path, recipe_hash: str, root_hash: str, mode: str, verify_files: bool = True, log=None, check=verify
) -> ResumePoint | None:
    """The newest valid checkpoint to resume from, or None to start fresh.

    mode: auto (resume when there is one), never (start fresh; refused when a usable checkpoint exists,
    so that a fresh run never mixes with an old one's), force (resume even from a different recipe or
    data). A torn or corrupted checkpoint is reported and skipped for the previous one; when there are
    checkpoints but none is usable, auto and force refuse (naming each one and its problem) rather than
    silently start over. `check(folder)` says what is wrong with a checkpoint (train.loop passes one that
    verifies in parallel on every rank); with verify_files=False only client.json's presence is checked.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tags = committed(root)

    def problem_of(tag: str) -> str | None:
        where = location(root, tag)
        if verify_files:
            return check(where)
        return None if (where / "client.json").exists() else "no client.json"

    problems: list[str] = []
    for tag in tags:
        problem = problem_of(tag)
        if problem:
            problems.append(f"{tag}: {problem}")
            if mode != "never":
                log(f"checkpoint {location(root, tag)}: {problem}; skipping it for an older one")
            continue
        if mode == "never":
            raise UserError(f"{root}: has checkpoints ({tag} ...) and --resume never: use another --run-dir")
        client = read_client(location(root, tag))
        if mode != "force":
            if client.get("manifest_root_hash") != root_hash:
                raise UserError(
                    f"{root / tag}: trained on data manifest {str(client.get('manifest_root_hash'))[:12]}, the "
                    f"recipe's manifest is {root_hash[:12]}: refusing to resume (--resume force to override)"
                )
            if client.get("recipe_hash") != recipe_hash:
                raise UserError(
                    f"{root / tag}: written by a different recipe (hash {str(client.get('recipe_hash'))[:12]} != "
                    f"{recipe_hash[:12]}): refusing to resume (--resume force to override)"
                )
        return ResumePoint(tag, location(root, tag), client)
    if problems and mode != "never":
        raise UserError(
            f"{root}: no usable checkpoint ({'; '.join(problems)}): refusing to start over silently; "
            "--resume never starts a fresh run here (the unusable checkpoints are set aside as unusable-<tag>)"
        )
    if problems:
        log(f"{root}: every checkpoint is unusable ({'; '.join(problems)}); starting fresh (--resume never)")
    return None


def set_aside_unusable(root: Path) -> list[str]:
    """Rank 0, on a fresh start over unusable checkpoints: rename each to `unusable-<tag>`, where neither
    the scan nor prune looks (kept for inspection); return the new names."""
    moved = []
    for tag in committed(root):
        where = location(root, tag)
        target = root / (UNUSABLE_PREFIX + tag)
        if target.exists():
            shutil.rmtree(target)
        os.replace(where, target)
        moved.append(target.name)
    if moved:
        _fsync_dir(root)
        (root / "latest").unlink(missing_ok=True)
    return moved
