"""Where the project lives and where outputs go.

Outputs (``runs/``, ``results/``, ``figures/``) go under the project root unless ``NLSR_HOME`` points
elsewhere (tests use a temporary directory so they never touch the committed figures).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def output_root() -> Path:
    return Path(os.environ.get("NLSR_HOME", PROJECT_ROOT)).resolve()


def runs_dir(profile: str) -> Path:
    return output_root() / "runs" / profile


def results_dir(profile: str) -> Path:
    return output_root() / "results" / profile


def figures_dir(profile: str) -> Path:
    return output_root() / "figures" / profile
