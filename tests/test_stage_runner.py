"""The stage runner as a user meets it: `python -m pipeline.<stage> <dataset>` in a shell."""

from __future__ import annotations

import ast
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


def help_of(command: str) -> tuple[str, list[str]]:
    """`python -m pipeline.<command> --help`: its text, and which slow-to-import libraries it loaded."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{command}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('pipeline.{command}', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'numpy', 'PIL', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text, imported = result.stdout.rsplit("IMPORTED", 1)
    return text, ast.literal_eval(imported.strip())


@pytest.mark.parametrize("command", ["download", "prepare", "train", "evaluate", "render", "predict", "manifest"])
def test_help_is_plain_text_and_loads_no_torch(command):
    """`--help` answers before a stage imports torch (which takes seconds), in plain text: no reST markup."""
    text, imported = help_of(command)
    assert "torch" not in imported
    assert f"usage: python -m pipeline.{command}" in text and "``" not in text and ":func:" not in text
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 5, text  # a sentence, not a fragment


def test_queued_experiments_share_the_cores_among_dvc_queue_workers(tmp_path, monkeypatch):
    """`dvc queue start -j N`: each worker's experiment (run in a copy under .dvc/tmp/exps/) takes its share of
    the cores; outside a queue, or with one worker, a run takes them all (and keeps its results' bits)."""
    from pipeline import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.chdir(tmp_path)
    assert runtime.default_threads() == 8 and runtime.default_threads(processes=2) == 4
    queued = tmp_path / "repo/.dvc/tmp/exps/tmpabc123"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    assert runtime.queue_workers() == 1 and runtime.default_threads() == 8  # no worker: a plain run there
    # Stand-ins for `dvc exp queue-worker dvc-exp-<hash>-<n>@localhost`, as `dvc queue start -j 2` starts them.
    workers = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "queue-worker", f"dvc-exp-0-{n}"])
        for n in (1, 2)
    ]
    try:
        assert runtime.queue_workers() == 2 and runtime.default_threads() == 4
        assert runtime.default_threads(processes=2) == 2
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert runtime.queue_workers() == 1
