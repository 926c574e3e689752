"""The README's "Add your own dataset" recipe, followed literally on datasets the test makes.

The params lines and commands are read out of README.md itself (the blocks after its ``<!-- recipe: ... -->``
markers) and pasted into params.yaml as text, where the README says, so the recipe cannot drift from what works:
only the data's location is replaced (the folder the test writes, a local HTTP server for the archive's URL)
and the training made tiny. Then ``dvc repro`` trains, evaluates and renders each dataset as it does the
built-in ones.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shlex
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.folder_data import write_binary_folder, write_rgb_zip
from tests.tiny_project import TINY_PARAMS, dvc, git, make_project, run, set_param, stages_run

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY_TRAIN = {"width": 4, "epochs": 3, "batch_size": 4, "lr": 0.01}


def recipe_block(name: str) -> str:
    """The fenced block that follows ``<!-- recipe: name -->`` in the README."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```\w*\n(.*?)```", README, re.S)
    assert match, f"README.md has no block after <!-- recipe: {name} -->"
    return match.group(1)


class _RefusingDuplicateKeys(yaml.SafeLoader):
    """YAML as DVC reads params.yaml: a key written twice in one mapping is an error, not the later value."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        assert not twice, f"params.yaml has duplicate keys {twice} once the README's blocks are pasted"
        return super().construct_mapping(node, deep)


def paste_recipe(repo: Path, recipe: str, replace: dict[str, str], train: dict) -> str:
    """What the README tells a user to do with ``recipe``, as text: its ``datasets`` line appended to the
    existing ``datasets:`` mapping, its section to the end of params.yaml, its sources to the end of config.yaml.
    Then, as the test's own change, the data's location replaced and the training made tiny. Returns the name."""
    line, section, sources = (recipe_block(f"{recipe}{part}") for part in (" datasets", "", " sources"))
    for old, new in replace.items():
        assert old in section + sources
        section, sources = section.replace(old, new), sources.replace(old, new)
    config = (repo / "config.yaml").read_text().rstrip("\n") + "\n\n" + sources
    yaml.load(config, _RefusingDuplicateKeys)
    (repo / "config.yaml").write_text(config)
    text = (repo / "params.yaml").read_text()
    mapping = re.search(r"^datasets:\n(?:[ \t]+\S.*\n)*", text, re.M)
    assert mapping, "params.yaml has no top-level datasets: mapping"
    text = text[: mapping.end()] + line + text[mapping.end() :].rstrip("\n") + "\n\n" + section
    before = yaml.safe_load((repo / "params.yaml").read_text())
    params = yaml.load(text, _RefusingDuplicateKeys)
    (name,) = yaml.safe_load(line)
    assert params["datasets"] == {**before["datasets"], name: "folder"} and set(params) == {*before, name}
    params[name]["train"] = {**params[name]["train"], **train}  # the tiny configuration
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def run_command(block: str, repo: Path, env: dict, replace: dict[str, str]) -> str:
    (line,) = [line for line in block.splitlines() if line.strip()]
    for old, new in replace.items():
        line = line.replace(old, new)
    args = shlex.split(line)
    assert args[0] == "python"  # the virtual environment's, wherever it lives
    return run([sys.executable, *args[1:]], repo, env).stdout


@pytest.fixture
def http_root(tmp_path):
    """A directory served over HTTP on 127.0.0.1 while the test runs; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_readme_recipe_adds_a_binary_and_an_rgb_multiclass_dataset(tmp_path, http_root):
    repo = tmp_path / "repo"
    env = make_project(repo, tmp_path / "mirror", TINY_PARAMS)
    leaves = write_binary_folder(tmp_path / "leaves", n=16)
    www, url = http_root
    write_rgb_zip(www / "scenes/scenes.zip", n=16)

    binary = {"/data/leaves": str(leaves)}
    name = paste_recipe(repo, "binary", binary, {**TINY_TRAIN, "epochs": 5, "patch_size": 32, "samples_per_epoch": 48})
    assert name == "leaves"
    said = run_command(recipe_block("command"), repo, env, binary)
    assert "pipeline/checksums/leaves.json" in said
    written = json.loads((repo / "pipeline/checksums/leaves.json").read_text())
    assert len(written["files"]) == 3 * 16  # images, masks and validity masks, each with its sha256

    remote = {"https://data.example.org": url}
    name = paste_recipe(
        repo,
        "multiclass",
        remote,
        {**TINY_TRAIN, "epochs": 8, "batch_size": 8, "patch_size": None, "samples_per_epoch": 128, "lr": 0.02},
    )
    assert name == "scenes"
    run_command(recipe_block("multiclass command"), repo, env, remote)
    assert set(json.loads((repo / "pipeline/checksums/scenes.json").read_text())["files"]) == {"scenes.zip"}

    targets = [f"{stage}@{ds}" for ds in ("leaves", "scenes") for stage in ("evaluate", "render")]
    result = dvc("repro", *targets, cwd=repo, env=env)
    assert stages_run(result.stdout) == {
        f"{stage}@{ds}"
        for ds in ("leaves", "scenes")
        for stage in ("download", "prepare", "train", "evaluate", "render")
    }

    # Sane metrics: the strokes and shapes are easy, so even a width-4 network trained for seconds ranks nearly
    # every stroke pixel above the background (ROC-AUC 0.999 here); its Dice at threshold 0.5 is lower, as its
    # probabilities are not yet calibrated, and varies more with the CPU's arithmetic, hence the looser bound.
    leaves_eval = json.loads((repo / "metrics/leaves/eval.json").read_text())
    assert leaves_eval["dice"] > 0.6 and leaves_eval["roc_auc"] > 0.98 and leaves_eval["pr_auc"] > 0.9, leaves_eval
    data = json.loads((repo / "metrics/leaves/data.json").read_text())
    # The ratio split draws each id's split from a hash of the seed and the id (stable when images are added):
    # about 15 % val and test, exactly so only on average.
    assert [s["images"] for s in data["splits"]] == [13, 1, 2]
    scenes = json.loads((repo / "metrics/scenes/evaluation.json").read_text())
    per_class = {record["class"]: record["dice"] for record in scenes["classes"]}
    assert per_class["background"] > 0.95 and per_class["disc"] > 0.8 and per_class["square"] > 0.8, per_class
    assert len(list((repo / "metrics/leaves/render/overlays").iterdir())) == 2  # one per test image
    assert (repo / "metrics/scenes/render/overlay_grid.png").stat().st_size > 0

    shown = dvc("metrics", "show", "--json", cwd=repo, env=env).stdout
    assert "metrics/leaves/eval.json" in shown and "metrics/scenes/eval.json" in shown
    assert "up to date" in dvc("status", *targets, cwd=repo, env=env).stdout


def test_a_failed_repro_leaves_no_raw_data_for_git_to_add(tmp_path):
    """`dvc repro` that fails at prepare, once fixed, leaves nothing that DVC caches untracked by git: DVC
    takes back the .gitignore entries it added during a failed command, those of the download that succeeded
    too, and the next run skips that download and never adds its entry again (treeverse/dvc#11091)."""
    repo = tmp_path / "repo"
    env = make_project(repo, tmp_path / "mirror", TINY_PARAMS)
    leaves = {"/data/leaves": str(write_binary_folder(tmp_path / "leaves", n=8))}
    paste_recipe(repo, "binary", leaves, TINY_TRAIN)
    run_command(recipe_block("command"), repo, env, leaves)
    set_param(repo, "leaves.prepare.channels", 2)  # the mistake: prepare fails after download succeeded
    failed = dvc("repro", "prepare@leaves", cwd=repo, env=env, check=False)
    assert failed.returncode != 0 and "leaves.prepare.channels: must be 1 or 3, got 2" in failed.stderr + failed.stdout
    set_param(repo, "leaves.prepare.channels", 3)
    assert stages_run(dvc("repro", "prepare@leaves", cwd=repo, env=env).stdout) == {"prepare@leaves"}

    status = git("status", "--porcelain", "--untracked-files=all", cwd=repo, env=env).splitlines()
    assert not [line for line in status if line[3:].startswith("data/") and not line.endswith(".gitignore")], status
    assert git("check-ignore", "data/raw/leaves/images/000.jpg", "data/prepared/leaves", cwd=repo, env=env).split() == [
        "data/raw/leaves/images/000.jpg",
        "data/prepared/leaves",
    ]
