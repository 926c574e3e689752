"""The team workflow, end to end through DVC, on tiny MNIST- and STARE-shaped data the test makes.

A temporary copy of the repository gets its own synthetic mirror, checksum manifests for it and a tiny
configuration; everything else -- dvc.yaml, the stages, DVC itself -- is the real thing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.browser import render_offline
from tests.test_plots_offline import chromium  # noqa: F401 (a fixture)
from tests.tiny_project import STAGES, TINY_PARAMS, dvc, git, make_project, run, set_param, stages_run, tree_digest


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of this repository configured for a tiny run, and the env to drive it."""
    base = tmp_path_factory.mktemp("e2e")
    repo = base / "repo"
    env = make_project(repo, base / "mirror", TINY_PARAMS)
    # A directory remote inside the test's directory, set in .dvc/config.local: an absolute path, so that
    # every DVC command and revision resolves it to the same place.
    dvc("remote", "add", "--local", "-d", "storage", str(base / "remote"), cwd=repo, env=env)
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
    assert set(results) == {"tp", "fp", "fn", "iou", "dice", "roc_auc", "pr_auc"}
    assert [s["split"] for s in data["splits"]] == ["train", "val", "test"]
    for picture in ("overlay_grid.png", "error_grid.png", "confusion.png"):
        assert (repo / "metrics/mnist/render" / picture).stat().st_size > 0

    stare_results = json.loads((repo / "metrics/stare/eval.json").read_text())
    assert {"dice", "roc_auc", "pr_auc", "train_threshold", "human_dice"} <= set(stare_results)
    test_ids = json.loads((repo / "metrics/stare/data.json").read_text())["test"]["ids"]
    assert sorted(p.stem for p in (repo / "metrics/stare/render/overlays").iterdir()) == sorted(test_ids)
    for dataset in ("mnist", "stare"):
        for curve in ("roc.csv", "pr.csv", "evaluation.json"):
            assert (repo / "metrics" / dataset / curve).stat().st_size > 0

    git("add", "-A", cwd=repo, env=env)
    git("commit", "-qm", "baseline run", cwd=repo, env=env)
    again = dvc("repro", cwd=repo, env=env)
    assert stages_run(again.stdout) == set()
    status = dvc("status", cwd=repo, env=env)
    assert "Data and pipelines are up to date" in status.stdout
    # Every metrics file's keys share one table: it must stay readable in a 200-column terminal.
    shown = dvc("metrics", "show", cwd=repo, env={**env, "COLUMNS": "200"}).stdout
    assert {"metrics/stare/eval.json", "metrics/mnist/train/metrics.json"} <= set(shown.split())
    assert max(map(len, shown.splitlines())) <= 200, shown


def changed_stages(repo: Path, env: dict) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=repo, env=env).stdout))


@pytest.mark.parametrize(
    "path, old, new, expected",
    [
        # A comment in STARE's dataset module: STARE's prepare, nothing of MNIST.
        ("pipeline/datasets/stare.py", "", "\n# a comment\n", {"prepare@stare"}),
        # STARE's prepare schema lives in the same module: a new parameter is STARE's alone.
        (
            "pipeline/datasets/stare.py",
            "    fov_erosion: int = 1",
            "    fov_erosion: int = 1\n    new_knob: int = 0",
            {"prepare@stare"},
        ),
        ("pipeline/render.py", "", "\n# a comment\n", {"render@mnist", "render@stare"}),
        # The threshold-free scores are evaluate's alone: training does not rerun for them.
        ("pipeline/metrics.py", "", "\n# a comment\n", {"evaluate@mnist", "evaluate@stare"}),
        (
            "pipeline/confusion.py",
            "",
            "\n# a comment\n",
            {"train@mnist", "train@stare", "evaluate@mnist", "evaluate@stare"},
        ),
        # Where the raw files come from and how long to wait: configuration, never a result, never a rerun.
        ("config.yaml", "retries: 1", "retries: 3", set()),
    ],
    ids=["stare-module", "stare-schema", "render", "metrics", "confusion", "config"],
)
def test_an_edit_reruns_only_the_stages_that_run_the_edited_code(project, path, old, new, expected):
    repo, env, _ = project
    dvc("repro", cwd=repo, env=env)
    assert changed_stages(repo, env) == set()
    source = repo / path
    original = source.read_text()
    assert old in original
    source.write_text(original.replace(old, new, 1) if old else original + new)
    try:
        assert changed_stages(repo, env) == expected
    finally:
        source.write_text(original)
    assert changed_stages(repo, env) == set()


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


def test_parameters_seen_before_are_restored_from_the_run_cache(project):
    repo, env, _ = project
    dvc("repro", cwd=repo, env=env)
    before = {path: tree_digest(repo / path) for path in ("data/models/mnist/model.pt", "metrics/mnist")}
    set_param(repo, "mnist.train.epochs", 3)
    try:
        assert stages_run(dvc("repro", cwd=repo, env=env).stdout) == {"train@mnist", "evaluate@mnist", "render@mnist"}
    finally:
        git("checkout", "--", "params.yaml", cwd=repo, env=env)
    again = dvc("repro", cwd=repo, env=env).stdout
    # Back to the committed params: every stage is restored from DVC's run-cache, none runs (nor trains).
    assert stages_run(again) == set()
    for stage in ("train@mnist", "evaluate@mnist", "render@mnist"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in again
    assert {path: tree_digest(repo / path) for path in before} == before
    assert "Data and pipelines are up to date" in dvc("status", cwd=repo, env=env).stdout


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
        assert "metrics/stare/eval.json" not in diff  # STARE did not change
        params_diff = json.loads(dvc("params", "diff", "main", "--json", cwd=repo, env=env).stdout)
        assert params_diff["params.yaml"]["mnist.train.epochs"] == {"old": 2, "new": 4, "diff": 2}
    finally:
        git("checkout", "-q", "main", cwd=repo, env=env)
        dvc("checkout", cwd=repo, env=env)


def test_plots_show_renders_curves_and_pictures(project):
    repo, env, base = project
    dvc("repro", cwd=repo, env=env)
    listed = json.loads(dvc("plots", "show", "--json", cwd=repo, env=env).stdout)
    assert not listed.get("errors")
    plots = {name: entries for name, entries in listed["data"].items()}
    # STARE trains on all its training images by default (stare.prepare.val_ids: []): no validation curves.
    for dataset, training_curves in (
        ("mnist", ("train_loss", "val_loss", "val_dice", "lr")),
        ("stare", ("train_loss", "lr")),
    ):
        curves = [f"metrics/{dataset}/{name}" for name in ("data.json", "evaluation.json", "roc.csv", "pr.csv")]
        curves += [f"metrics/{dataset}/train/plots/metrics/{name}.tsv" for name in training_curves]
        for name in curves:
            assert [entry["type"] for entry in plots[name]] == ["vega"], name
    assert not any("stare/train/plots/metrics/val_" in name for name in plots)
    # The per-class bars draw exactly evaluation.json's classes: no other list of the file merged into them.
    for dataset in ("mnist", "stare"):
        (entry,) = plots[f"metrics/{dataset}/evaluation.json"]
        drawn = [(point["class"], point["dice"]) for point in entry["content"]["data"]["values"]]
        classes = json.loads((repo / f"metrics/{dataset}/evaluation.json").read_text())["classes"]
        assert drawn == [(c["class"], c["dice"]) for c in classes], dataset
    # Near-perfect curves off the frame: ROC on a log false-positive axis, precision-recall as log error rates.
    roc, pr = (plots[f"metrics/mnist/{name}"][0]["content"]["encoding"] for name in ("roc.csv", "pr.csv"))
    assert roc["x"]["scale"]["type"] == "log"
    assert pr["x"]["scale"]["type"] == pr["y"]["scale"]["type"] == "log"
    assert (pr["x"]["title"], pr["y"]["title"]) == ("1 - recall (log)", "1 - precision (log)")
    pictures = {name for name, entries in plots.items() if entries and entries[0]["type"] == "image"}
    assert {"metrics/mnist/render/overlay_grid.png", "metrics/mnist/render/error_grid.png"} <= pictures
    assert {
        f"metrics/stare/render/overlays/{i}.jpg"
        for i in json.loads((repo / "metrics/stare/data.json").read_text())["test"]["ids"]
    } <= pictures
    out_dir = base / "plots"
    dvc("plots", "show", "-o", str(out_dir), cwd=repo, env=env)
    html = (out_dir / "index.html").read_text()
    assert "stare test ROC, foreground against background" in html and "mnist test Dice per class" in html


def test_the_plots_page_draws_every_curve_offline(project, chromium):
    repo, env, base = project
    dvc("repro", cwd=repo, env=env)
    out_dir = base / "plots-offline"
    dvc("plots", "show", "-o", str(out_dir), cwd=repo, env=env)
    listed = json.loads(dvc("plots", "show", "--json", cwd=repo, env=env).stdout)["data"]
    curves = sum(1 for entries in listed.values() if entries and entries[0]["type"] == "vega")
    page = render_offline(out_dir / "index.html", out_dir / "screenshot.png", chromium=chromium)
    drawn = [name for name, div in page.divs.items() if div.charts]
    assert curves >= 14 and len(drawn) == curves, (page.network, page.divs)  # 8 for MNIST, 6 for STARE


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
    result = run(
        [sys.executable, "-m", "pipeline.download", "mnist"], repo, {**env, "SEGPIPE_MIRROR": str(mirror)}, check=False
    )
    assert result.returncode == 1
    # Refused by its whole-file sha256, before any byte of it reaches gzip (docs/download.md).
    assert "t10k-images-idx3-ubyte.gz: sha256 is " in result.stderr and ", expected " in result.stderr
    assert not (repo / "data" / "raw" / "mnist").exists()
    assert not list((repo / "data" / "raw").glob(".mnist.tmp-*"))
    dvc("checkout", cwd=repo, env=env)
