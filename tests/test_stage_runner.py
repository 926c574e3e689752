"""The stage runner as a user meets it: `python -m pipeline.<stage> <dataset>` in a shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "evaluate", "render"])
def test_a_user_error_names_the_stage_and_dataset_in_one_line(tmp_path, stage):
    (tmp_path / "params.yaml").write_text("datasets: {mnist: mnist}\nmnist: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", "cifar"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{stage} cifar: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "cifar" in result.stderr.split("error: ", 1)[1]
