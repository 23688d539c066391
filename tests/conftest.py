"""Shared fixtures: outputs of every test go to a temporary NLSR_HOME, never into the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NLSR_QUIET", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture()
def nlsr_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    return tmp_path
