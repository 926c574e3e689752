"""A temporary git + DVC copy of this repository with a synthetic mirror and a tiny configuration.

Everything but the data and the sizes is the real thing: dvc.yaml, the stages, DVC and git, driven through
their command lines as a user would. Shared by the end-to-end tests (test_pipeline_e2e.py, test_remotes.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.synthetic import H, W, build_mnist, build_raw, manifest_for

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "train", "evaluate", "render")

TINY_PARAMS = {
    "datasets": {"mnist": "mnist", "stare": "stare"},
    "mnist": {
        "download": {"base_urls": [], "timeout_s": 5, "retries": 1},
        "prepare": {"threshold": 0.2, "val_size": 40, "train_size": 160, "test_size": 60, "seed": 0},
        # Enough steps to move a 7.6 k-parameter model, so that more epochs visibly change the metrics.
        "train": {
            "arch": "simple_unet",
            "width": 4,
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.01,
            "seed": 0,
            "augment": {"affine": {"p": 1.0, "interpolation": "nearest"}},
        },
        "evaluate": {"batch_size": 64},
        "render": {"grid": 3, "alpha": 0.5, "scale": 2},
    },
    "stare": {
        "download": {"base_urls": [], "timeout_s": 5, "retries": 1},
        "prepare": {"image_size": [H, W], "fov_smoothing": 1.0},
        "train": {
            "arch": "vgg_unet",
            "width": 4,
            "epochs": 1,
            "batch_size": 4,
            "lr": 0.01,
            "loss": "bce_dice",
            "patch_size": 32,
            "samples_per_epoch": 16,
            "augment": {
                "flips": True,
                "rotate90": True,
                "brightness_contrast": 0.1,
                "gamma": 0.1,
                "affine": {"p": 0.5, "rotate": 15},
            },
        },
        "evaluate": {"batch_size": 4},
        "render": {"scale": 1, "batch_size": 4},
    },
}

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def run(
    args: list[str], cwd: Path, env: dict, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, env, check)


def git(*args: str, cwd: Path, env: dict) -> str:
    return run(["git", *args], cwd, env).stdout


def set_param(repo: Path, key: str, value) -> None:
    """Set a dotted key (``mnist.train.epochs``) in the copy's params.yaml, as a user editing it would."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    section = params
    for name in parents:
        section = section[name]
    section[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_params(repo: Path, params: dict) -> None:
    """``params`` as the project keeps them: the download sections in config.yaml (never a result's), the rest in
    params.yaml."""
    params = {name: dict(section) if isinstance(section, dict) else section for name, section in params.items()}
    config = {
        name: {"download": section.pop("download")}
        for name, section in params.items()
        if isinstance(section, dict) and "download" in section
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of a file, or of every file below a directory."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def make_project(repo: Path, mirror: Path, params: dict) -> dict:
    """Copy this repository's code to ``repo`` as a fresh git repository with one commit, reading its raw
    files from a synthetic ``mirror`` (built unless it exists) under ``params``; returns the env to drive it.

    No DVC remote is configured: each test adds the one it needs."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        source = REPO / name
        if name.startswith(("data/", "metrics/")) or name == "dvc.lock" or not source.is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, repo / name)

    if not mirror.exists():
        build_mnist(mirror / "mnist")
        build_raw(mirror / "stare")
    for dataset in ("mnist", "stare"):
        manifest = manifest_for(mirror / dataset)
        (repo / f"pipeline/checksums/{dataset}.json").write_text(json.dumps(manifest, indent=2))
    write_params(repo, params)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in dvc.yaml
        "SEGPIPE_MIRROR": str(mirror),
        "DVC_NO_ANALYTICS": "1",
        **GIT_IDENTITY,
    }
    git("init", "-q", "-b", "main", cwd=repo, env=env)
    git("add", "-A", cwd=repo, env=env)
    git("commit", "-qm", "tiny configuration", cwd=repo, env=env)
    return env
