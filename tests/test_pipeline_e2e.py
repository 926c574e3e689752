"""The team workflow, end to end through DVC, on tiny MNIST- and STARE-shaped data the test makes.

A temporary copy of the repository gets its own synthetic mirror, checksum manifests for it and a tiny
configuration; everything else -- dvc.yaml, the stages, DVC itself -- is the real thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import H, W, build_mnist, build_raw, manifest_for

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "train", "evaluate", "render")

TINY_PARAMS = {
    "datasets": ["mnist", "stare"],
    "mnist": {
        "download": {"base_urls": [], "timeout_s": 5, "retries": 1},
        "prepare": {"threshold": 0.2, "val_size": 40, "train_size": 160, "test_size": 60, "seed": 0},
        # Enough steps to move a 7.6 k-parameter model, so that more epochs visibly change the metrics.
        "train": {"arch": "simple_unet", "width": 4, "epochs": 2, "batch_size": 16, "lr": 0.01, "seed": 0,
                  "augment": {"affine": {"p": 1.0, "interpolation": "nearest"}}},
        "evaluate": {"batch_size": 64},
        "render": {"grid": 3, "alpha": 0.5, "scale": 2},
    },
    "stare": {
        "download": {"base_urls": [], "timeout_s": 5, "retries": 1},
        "prepare": {"image_size": [H, W], "fov_smoothing": 1.0},
        "train": {"arch": "vgg_unet", "width": 4, "epochs": 1, "batch_size": 4, "lr": 0.01, "loss": "bce_dice",
                  "patch_size": 32, "samples_per_epoch": 16,
                  "augment": {"flips": True, "rotate90": True, "brightness_contrast": 0.1, "gamma": 0.1,
                              "affine": {"p": 0.5, "rotate": 15}}},
        "evaluate": {"batch_size": 4},
        "render": {"scale": 1, "batch_size": 4},
    },
}


def run(args: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
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


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of a file, or of every file below a directory."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of this repository configured for a tiny MNIST run, and the env to drive it."""
    base = tmp_path_factory.mktemp("e2e")
    repo = base / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        source = REPO / name
        if name.startswith(("data/", "metrics/")) or name == "dvc.lock" or not source.is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, repo / name)

    build_mnist(base / "mirror" / "mnist")
    build_raw(base / "mirror" / "stare")
    for dataset in ("mnist", "stare"):
        manifest = manifest_for(base / "mirror" / dataset)
        (repo / f"pipeline/checksums/{dataset}.json").write_text(json.dumps(manifest, indent=2))
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    # Keep the remote inside the test's directory, not beside the developer's checkout.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in dvc.yaml
        "SEGPIPE_MIRROR": str(base / "mirror"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    git("init", "-q", "-b", "main", cwd=repo, env=env)
    dvc("remote", "modify", "--local", "local", "url", str(base / "remote"), cwd=repo, env=env)
    git("add", "-A", cwd=repo, env=env)
    git("commit", "-qm", "tiny configuration", cwd=repo, env=env)
    return repo, env, base


def test_repro_builds_only_what_is_asked_then_nothing_twice(project):
    repo, env, _ = project
    partial = dvc("repro", "train@stare", cwd=repo, env=env)
    assert stages_run(partial.stdout) == {"download@stare", "prepare@stare", "train@stare"}

    full = dvc("repro", cwd=repo, env=env)
    everything = {f"{stage}@{dataset}" for stage in STAGES for dataset in ("mnist", "stare")}
    assert stages_run(full.stdout) == everything - stages_run(partial.stdout)

    results = json.loads((repo / "metrics/mnist/eval.json").read_text())
    data = json.loads((repo / "metrics/mnist/data.json").read_text())
    assert results["tp"] + results["fn"] == data["test"]["foreground_pixels"]
    assert {"tp", "fp", "fn", "iou", "dice", "accuracy", "per_class"} <= set(results)
    for picture in ("overlay_grid.png", "error_grid.png", "confusion.png"):
        assert (repo / "metrics/mnist/render" / picture).stat().st_size > 0

    stare_results = json.loads((repo / "metrics/stare/eval.json").read_text())
    assert {"f1", "roc_auc", "pr_auc", "f1_at_train_threshold", "human", "per_image_mean"} <= set(stare_results)
    test_ids = json.loads((repo / "metrics/stare/data.json").read_text())["test"]["ids"]
    assert sorted(p.stem for p in (repo / "metrics/stare/render/overlays").iterdir()) == sorted(test_ids)
    for curve in ("roc.csv", "pr.csv", "per_image.csv"):
        assert (repo / "metrics/stare/evaluation" / curve).stat().st_size > 0

    git("add", "-A", cwd=repo, env=env)
    git("commit", "-qm", "baseline run", cwd=repo, env=env)
    again = dvc("repro", cwd=repo, env=env)
    assert stages_run(again.stdout) == set()
    status = dvc("status", cwd=repo, env=env)
    assert "Data and pipelines are up to date" in status.stdout


def test_render_param_reruns_only_render(project):
    repo, env, _ = project
    dvc("repro", cwd=repo, env=env)  # in case this test runs alone
    set_param(repo, "mnist.render.alpha", 0.8)
    try:
        out = dvc("repro", cwd=repo, env=env)
        assert stages_run(out.stdout) == {"render@mnist"}
    finally:
        git("checkout", "--", "params.yaml", cwd=repo, env=env)
        dvc("repro", cwd=repo, env=env)


def test_metrics_diff_across_branches(project):
    repo, env, _ = project
    dvc("repro", cwd=repo, env=env)
    git("checkout", "-q", "-b", "more-epochs", cwd=repo, env=env)
    try:
        set_param(repo, "mnist.train.epochs", 4)
        out = dvc("repro", cwd=repo, env=env)
        assert stages_run(out.stdout) == {"train@mnist", "evaluate@mnist", "render@mnist"}
        git("add", "-A", cwd=repo, env=env)
        git("commit", "-qm", "four epochs", cwd=repo, env=env)

        diff = json.loads(dvc("metrics", "diff", "main", "--json", cwd=repo, env=env).stdout)
        changed = diff["metrics/mnist/eval.json"]
        assert changed["dice"]["old"] != changed["dice"]["new"]
        assert changed["tp"]["diff"] == changed["tp"]["new"] - changed["tp"]["old"]
        # The data did not change, so its summary is not in the diff (or shows no change).
        assert all(v.get("diff", 0) == 0 for v in diff.get("metrics/mnist/data.json", {}).values())
        params_diff = json.loads(dvc("params", "diff", "main", "--json", cwd=repo, env=env).stdout)
        assert params_diff["params.yaml"]["mnist.train.epochs"] == {"old": 2, "new": 4, "diff": 2}
    finally:
        git("checkout", "-q", "main", cwd=repo, env=env)
        dvc("checkout", cwd=repo, env=env)


def test_plots_show_renders_curves_and_pictures(project):
    repo, env, base = project
    dvc("repro", cwd=repo, env=env)
    out_dir = base / "plots"
    dvc("plots", "show", "-o", str(out_dir), cwd=repo, env=env)
    html = (out_dir / "index.html").read_text()
    assert "overlay_grid.png" in html and "error_grid.png" in html
    assert "val_dice" in html and "train_loss" in html
    assert "STARE test ROC" in html and "STARE test precision-recall" in html
    assert "metrics_stare_render_overlays" in html or "render/overlays" in html


def test_push_then_pull_restores_identical_outputs(project):
    repo, env, base = project
    dvc("repro", cwd=repo, env=env)
    outputs = [repo / "data/raw/mnist", repo / "data/prepared/mnist", repo / "data/models/mnist/model.pt"]
    before = [tree_digest(path) for path in outputs]
    dvc("push", cwd=repo, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")
    for path in outputs:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    dvc("pull", cwd=repo, env=env)
    assert [tree_digest(path) for path in outputs] == before
    assert all(before)  # every output had files to compare
    assert "Data and pipelines are up to date" in dvc("status", cwd=repo, env=env).stdout


def test_corrupt_mirror_file_fails_cleanly(project, tmp_path):
    repo, env, base = project
    mirror = tmp_path / "mirror"
    shutil.copytree(base / "mirror", mirror)
    victim = mirror / "mnist" / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-20])  # truncated: the gzip trailer is gone
    shutil.rmtree(repo / "data" / "raw" / "mnist", ignore_errors=True)
    result = run([sys.executable, "-m", "pipeline.download", "mnist"], repo, {**env, "SEGPIPE_MIRROR": str(mirror)},
                 check=False)
    assert result.returncode == 1
    assert "t10k-images-idx3-ubyte.gz" in result.stderr and "gzip" in result.stderr
    assert not (repo / "data" / "raw" / "mnist").exists()
    assert not list((repo / "data" / "raw").glob(".mnist.tmp-*"))
    dvc("checkout", cwd=repo, env=env)
