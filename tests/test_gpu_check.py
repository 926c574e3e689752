"""benchmarks/gpu_check.py's CPU dry run: every step of the GPU check runs on tiny data (or says why not), so that
the script cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"status": "skipped", "reason": gpu_check.NO_CUDA["reason"]}


def probe_wheel(directory: Path) -> Path:
    """A tiny pure-Python wheel, as the device run carries its missing packages."""
    directory.mkdir()
    path = directory / "gpucheck_probe-1.0-py3-none-any.whl"
    info = "gpucheck_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gpucheck_probe.py", "VALUE = 1\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", f"gpucheck_probe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return directory


def dry_run(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    return result, json.loads((out / "gpu_check.json").read_text())


def test_the_dry_run_runs_every_step_on_the_cpu_and_says_why_the_cuda_ones_did_not(tmp_path):
    result, report = dry_run(tmp_path / "out", "--wheels", str(probe_wheel(tmp_path / "wheels")))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = report["steps"]
    assert list(steps) == list(gpu_check.STEPS) and report["not_reached"] == []
    assert report["mode"] == "dry-run" and report["machine"]["gpu"] == CUDA_ONLY

    assert steps["install"]["status"] == "ok" and steps["install"]["wheels"] == ["gpucheck_probe-1.0-py3-none-any.whl"]
    assert steps["environment"]["status"] == "ok" and steps["environment"]["cuda"] is False
    assert steps["environment"]["missing_modules"] == {}
    # The CUDA tests ran by node id, and pytest skipped both, saying why.
    tests = steps["cuda_tests"]["tests"]
    assert steps["cuda_tests"]["status"] == "skipped" and "CUDA" in steps["cuda_tests"]["reason"]
    assert sorted(tests) == sorted(node.split("::")[1] for node in gpu_check.CUDA_TESTS)
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests.values())
    assert steps["data"]["status"] == "ok"

    for dataset in ("mnist", "stare"):
        fp32 = steps[f"train_{dataset}_fp32"]
        assert fp32["status"] == "ok", fp32
        assert fp32["train_wall_s"] > 0 and fp32["evaluate_wall_s"] > 0 and fp32["images_per_s"] >= 0
        assert 0 <= fp32["test"]["dice"] <= 1 and " fp32 " in fp32["runtime"]
        assert fp32["gpu_peak_bytes"] == {"train": CUDA_ONLY, "evaluate": CUDA_ONLY}
        auto = steps[f"train_{dataset}_auto"]
        assert auto["status"] == "skipped" and "auto is fp32" in auto["reason"]
    epochs = steps["train_mnist_fp32"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["dice"] <= 1 and e["seconds"] > 0 for e in epochs)
    assert "seconds_to_tutorial_dice" in steps["train_mnist_fp32"]  # None: tiny data never gets there

    torchrun = steps["torchrun"]
    assert torchrun["status"] == "ok" and torchrun["stage"]["rc"] == 0
    assert torchrun["group"]["backend"] == "gloo" and torchrun["group"]["world"] == 1
    assert 0 <= torchrun["group"]["val_dice"] <= 1
    assert torchrun["nccl"]["status"] == "skipped" and "gloo" in torchrun["nccl"]["reason"]
    for dataset in ("mnist", "stare"):
        inference, loader = steps["inference"][dataset], steps["loader"][dataset]
        assert inference["images_per_s"] > 0 and inference["gpu_peak_allocated_bytes"]["status"] == "skipped"
        assert loader["images_per_s"] > 0 and loader["images_per_s_preloaded"] > 0
        assert 0 <= loader["data_wait_share"] <= 1 and loader["device"] == "cpu"
    assert steps["inference"]["status"] == steps["loader"]["status"] == "ok"

    log = (tmp_path / "out/gpu_check.log").read_text()
    assert "-m benchmarks.gpu_check --stage train mnist" in log and "pipeline.train mnist" in log


def test_a_spent_budget_leaves_every_step_not_reached_with_its_reason(tmp_path):
    result, report = dry_run(tmp_path, "--budget-s", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["not_reached"] == list(gpu_check.STEPS)
    assert report["steps"]["install"]["reason"] == "budget: 0 s left, the step needs about 15 s"
    for name, step in report["steps"].items():  # the later ones say what they wait for, and why that did not run
        assert step["status"] == "not_reached" and "budget: 0 s left" in step["reason"], (name, step)
    assert (tmp_path / "gpu_check.log").exists()


def test_the_cuda_tests_stage_processes_keep_the_installed_wheels_on_their_path(monkeypatch, tmp_path):
    """--wheels puts the carried packages on PYTHONPATH; the CUDA tests start the stage with a PYTHONPATH of their
    own, which must keep them (a bare GPU machine has no albumentations or dvclive of its own)."""
    from tests import test_distributed
    from tests.training_hooks import HOOKS

    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    paths = test_distributed.command(tmp_path)["env"]["PYTHONPATH"].split(os.pathsep)
    # The tests' sitecustomize first (it imports nothing of the repository's), then the repository's code.
    assert paths[:2] == [str(HOOKS), str(REPO)] and str(tmp_path / "site") in paths
