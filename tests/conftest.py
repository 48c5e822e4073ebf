"""Shared fixtures: real text from the embedded demo corpus, and the environment tests run in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"

# No network, no hub, no wandb server: tests make or ship their data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def demo_texts() -> list[str]:
    """Paragraphs of the embedded French novels and Shakespeare (real text, a few hundred KB)."""
    texts: list[str] = []
    for path in sorted((DEMO / "nouvelles19" / "txt").glob("*.txt"))[:4] + [
        DEMO / "shakespeare" / "tinyshakespeare-excerpt.txt"
    ]:
        body = path.read_text(encoding="utf-8")
        texts += [p for p in body.split("\n\n") if p.strip()][:400]
    return texts


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo corpus prepared once per session (`communs data prepare`): DATA_DIR."""
    import communs

    out = tmp_path_factory.mktemp("demo-data") / "data"
    assert communs.main(["data", "prepare", str(DEMO / "sources.yaml"), "--out", str(out)]) == 0
    return out
