"""Hostile params.yaml files and dataset names: each is one line naming the file, key or name, and nothing is
written outside the repository (issue 17: items 2, 3, 15, 16, 19, 20, 21)."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import (
    checkpoint,
    download,
    evaluate,
    manifest,
    models,
    params,
    predict,
    prepare,
    render,
    train,
    train_params,
)
from pipeline.fetch import DownloadParams
from pipeline.params import CONFIG_FILE, ParamError, load_params, read_params_file
from pipeline.prepared import DatasetMeta, Split
from pipeline.stage import DatasetPaths, StageError, main
from tests.test_evaluate_render import make_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"arch": "simple_unet", "width": 8, "epochs": 2, "batch_size": 16, "lr": 0.001}
STAGES = {
    "download": download.download_stage,
    "prepare": prepare.prepare,
    "train": train.train,
    "evaluate": evaluate.evaluate,
    "render": render.render,
}


def stage_in(cwd: Path, stage: str, dataset: str, **limits) -> subprocess.CompletedProcess:
    """``python -m pipeline.<stage> <dataset>`` in ``cwd`` as a user runs it (``limits``: resource limits)."""

    def limit():
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))

    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", dataset],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
        preexec_fn=limit if limits else None,
    )


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    return text.rstrip("\n")


# ------------------------------------------------------------------------------------------ item 2: names


@pytest.fixture
def escape(tmp_path):
    """A repository whose params.yaml names a dataset by an absolute path outside it, with everything download
    needs to fill that path: a folder source and a manifest, which the checksums directory joined with the
    absolute name would find beside the target."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir(), outside.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_bytes(b"escaped\n")
    target = outside / "escape_ds"
    (outside / "escape_ds.json").write_text(
        json.dumps({"files": {"a.txt": {"sha256": hashlib.sha256(b"escaped\n").hexdigest(), "bytes": 8}}})
    )
    (repo / "params.yaml").write_text(
        yaml.safe_dump({"datasets": {str(target): "folder"}, str(target): {"train": TRAIN}})
    )
    download = {"download": {"base_urls": [str(source)], "retries": 1}}
    (repo / "config.yaml").write_text(yaml.safe_dump({str(target): download}))
    return repo, target


@pytest.mark.parametrize("stage", STAGES)
def test_a_dataset_name_that_is_a_path_is_refused_by_every_stage(escape, stage):
    repo, target = escape
    result = stage_in(repo, stage, str(target))
    assert result.returncode == 1
    shown = f"{str(target)!r:.80}"  # at most 80 characters of the name are quoted
    assert one_line(result.stderr) == (
        f"{stage} {shown}: error: dataset: {shown} is not a dataset name (letters, digits, '_' and '-')"
    )
    assert not target.exists() and sorted(p.name for p in target.parent.iterdir()) == ["escape_ds.json"]


@pytest.mark.parametrize("name", ["../../../x", "..", "a/b", ".hidden", "a.b", "", "a\nb", "\x1b[2J", "x" * 65])
def test_bad_names_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({name: {"train": TRAIN}}))
    for stage, function in STAGES.items():
        assert main(function, [name]) == 1
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"{stage} {name!r:.80}: error: dataset: {name!r:.80} is not a dataset name (")
    assert predict.main([name, str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "is not a dataset name" in one_line(capsys.readouterr().err)
    for path_name in (name, "-rf"):  # "-rf" only through code: on a command line it is an option
        with pytest.raises(StageError, match="is not a dataset name"):
            DatasetPaths(path_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_plain_names_are_accepted():
    for name in ("mnist", "STARE_2", "leaves-v2", "_x", "0", "x" * 64):
        assert DatasetPaths(name).raw == Path("data/raw") / name


def test_a_bad_name_in_the_datasets_mapping_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        yaml.safe_dump({"datasets": {"mnist": "mnist", "../../x": "folder"}, "mnist": {"train": TRAIN}})
    )
    with pytest.raises(ParamError) as error:
        load_params("mnist", "train", train.TrainParams)
    assert str(error.value) == ("params.yaml: datasets: '../../x' is not a dataset name (letters, digits, '_' and '-')")


def test_manifest_uses_the_same_rule():
    with pytest.raises(StageError) as error:
        manifest.write_manifest("x" * 65, ["/nonexistent"])
    assert str(error.value) == f"--dataset: {'x' * 65!r} is not a dataset name (at most 64 characters)"


# ------------------------------------------------------------------------------------------ items 19, 21: the file


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_bytes("mnist:\n  train: {arch: simple_unet}  # café\n".encode("latin-1"))
    assert main(train.train, ["mnist"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "train mnist: error: params.yaml: not UTF-8 text (byte 0xe9 at offset 42); save it as UTF-8"
    )


def test_a_params_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").mkdir()
    assert main(train.train, ["mnist"]) == 1
    assert one_line(capsys.readouterr().err) == "train mnist: error: params.yaml: cannot read it (Is a directory)"


def test_invalid_yaml_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("mnist:\n  train: {arch: [\n")
    assert main(train.train, ["mnist"]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith("train mnist: error: params.yaml: not valid YAML: ") and "line 3" in err


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "datasets: {mnist: mnist}\nmnist: {}\ndatasets: {x: folder}\n",
            "line 3: duplicate key datasets (first at line 1)",
        ),
        (
            "mnist:\n  train:\n    epochs: 2\n    lr: 0.1\n    epochs: 20\n",
            "line 5: duplicate key mnist.train.epochs (first at line 3)",
        ),
        ("mnist: {train: {arch: a, arch: b}}\n", "line 1: duplicate key mnist.train.arch (first at line 1)"),
        ("l:\n  - {a: 1, a: 2}\n", "line 2: duplicate key l[0].a (first at line 2)"),
    ],
)
def test_duplicate_keys_are_refused_at_any_depth(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamError) as error:
        read_params_file(path)
    assert str(error.value) == f"{path}: {message}"


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: &b {epochs: 2, lr: 0.1}\nmnist:\n  train:\n    <<: *b\n    epochs: 3\n")
    assert read_params_file(path)["mnist"]["train"] == {"epochs": 3, "lr": 0.1}


def test_every_reader_of_config_yaml_refuses_duplicates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("datasets: {mnist: mnist}\nmnist: {}\n")
    Path("config.yaml").write_text("mnist:\n  download: {base_urls: [/a], base_urls: [/b]}\n")
    message = "config.yaml: line 2: duplicate key mnist.download.base_urls (first at line 2)"
    assert main(download.download_stage, ["mnist"]) == 1
    assert one_line(capsys.readouterr().err) == f"download mnist: error: {message}"
    assert manifest.main(["--dataset", "mnist"]) == 1
    assert one_line(capsys.readouterr().err) == f"manifest: error: {message}"


def test_config_yaml_and_its_sections_are_optional_and_checked_like_params(tmp_path, monkeypatch, capsys):
    """No config.yaml, or no section for the dataset: the defaults (no sources but the mirror); a bad value: one
    line naming config.yaml and the key."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("datasets: {mnist: mnist}\nmnist: {}\n")
    assert load_params("mnist", "download", DownloadParams, CONFIG_FILE) == DownloadParams()
    Path("config.yaml").write_text("stare:\n  download: {retries: 2}\n")
    assert load_params("mnist", "download", DownloadParams, CONFIG_FILE) == DownloadParams()
    Path("config.yaml").write_text("mnist:\n  download: {retries: 0}\n")
    assert main(download.download_stage, ["mnist"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "download mnist: error: config.yaml: mnist.download.retries: must be between 1 and 10, got 0"
    )
    Path("config.yaml").write_text("mnist:\n  donwload: {retries: 2}\n")
    assert main(download.download_stage, ["mnist"]) == 1
    assert "config.yaml: mnist.donwload: unknown stage section" in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ item 20: kinds


@pytest.mark.parametrize("kind", ["__init__", "archives", "params", "os"])
def test_a_kind_must_be_one_of_the_dataset_kinds(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"datasets": {"mnist": kind}, "mnist": {}}))
    assert main(prepare.prepare, ["mnist"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"prepare mnist: error: params.yaml: datasets.mnist: no kind "
        f"{kind!r} (a kind is a module of pipeline/datasets/); kinds: "
        "folder, mnist, stare"
    )


def test_the_kinds_are_the_dataset_modules():
    modules = {path.stem for path in (REPO / "pipeline/datasets").glob("*.py")} - {"__init__"}
    assert set(prepare.KINDS) == modules


# ------------------------------------------------------------------------------------------ items 15, 16: train


def test_width_is_bounded_by_what_a_checkpoint_may_hold(tmp_path):
    limit = checkpoint.MODEL_LIMITS["width"]
    path = tmp_path / "params.yaml"
    for width in (limit + 1, 100000):
        path.write_text(yaml.safe_dump({"mnist": {"train": {**TRAIN, "width": width}}}))
        with pytest.raises(ParamError) as error:
            load_params("mnist", "train", train.TrainParams, path)
        assert str(error.value) == (
            f"{path}: mnist.train.width: must be in [1, {limit}] (the widest network a "
            f"checkpoint may hold), got {width}"
        )
    path.write_text(yaml.safe_dump({"mnist": {"train": {**TRAIN, "width": limit}}}))
    assert load_params("mnist", "train", train.TrainParams, path).width == limit


def test_the_width_limit_keeps_the_largest_network_small():
    for arch in models.ARCHITECTURES:
        with torch.device("meta"):
            model = models.build_model({"arch": arch, **checkpoint.MODEL_LIMITS})
        assert sum(p.numel() for p in model.parameters()) * 4 < 1 << 30  # bytes of float32 weights


def test_threads_are_bounded_by_the_usable_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(train_params, "usable_cores", lambda: 2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"mnist": {"train": {**TRAIN, "threads": 10000}}}))
    with pytest.raises(ParamError) as error:
        load_params("mnist", "train", train.TrainParams, path)
    assert str(error.value) == (
        f"{path}: mnist.train.threads: must be at most 8 (4 per usable core, 2 here: more "
        "threads than that wait on each other) or null, got 10000"
    )
    path.write_text(yaml.safe_dump({"mnist": {"train": {**TRAIN, "threads": 8}}}))
    assert load_params("mnist", "train", train.TrainParams, path).threads == 8


def test_processes_are_bounded(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"mnist": {"train": {**TRAIN, "processes": 10000, "batch_size": 20000}}}))
    with pytest.raises(ParamError) as error:
        load_params("mnist", "train", train.TrainParams, path)
    assert str(error.value) == (
        f"{path}: mnist.train.processes: must be at most {train_params.MAX_PROCESSES} (the "
        "world size, all nodes together), got 10000"
    )


@pytest.mark.parametrize(
    "cuda, message",
    [
        (False, "toy.train.processes: must be at most 8 to run on this machine (4 per usable core, 2 here), got 16"),
        (True, "toy.train.processes: must be at most 2 to run on this machine (one per GPU, 2 here), got 16"),
    ],
)
def test_a_local_launch_is_bounded_by_the_machine(tmp_path, monkeypatch, capsys, cuda, message):
    from tests.test_distributed import project

    project(tmp_path, processes=16, batch_size=16, samples_per_epoch=32)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_params, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(train, "launch", lambda *a: pytest.fail("launched"))
    assert main(train.train, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == f"train toy: error: {message}"


# ------------------------------------------------------------------------------------------ item 3: render


@pytest.fixture
def digits(tmp_path, monkeypatch):
    """28 x 28 digits, an untrained checkpoint and evaluate's output: what render reads."""
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    rng = np.random.default_rng(0)
    classes = ["background", "one", "two"]

    def split(n: int) -> Split:
        return Split(
            rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 3, (n, 28, 28), dtype=np.uint8),
            np.array([f"m{i}" for i in range(n)]),
        )

    make_dataset(
        tmp_path,
        "toy",
        DatasetMeta("toy", "multiclass", classes, [[0, 0, 0], [255, 0, 0], [0, 255, 0]]),
        {"train": split(2), "val": split(2), "test": split(4)},
        "simple_unet",
    )
    monkeypatch.chdir(tmp_path)
    assert main(evaluate.evaluate, ["toy"]) == 0
    return tmp_path


def set_render(root: Path, **section) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["toy"]["render"] = section
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def test_render_refuses_a_picture_too_large_to_draw(digits):
    """Before the bound, grid 32 x scale 16 drew a 14,336-pixel square: 21.7 GiB. Under a 6 GiB address-space
    limit the refusal comes at once, and nothing is written."""
    set_render(digits, grid=32, scale=16)
    result = stage_in(digits, "render", "toy", RLIMIT_AS=6 << 30)
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == (
        "render toy: error: params.yaml: toy.render: grid 32 x scale 16 draws a 14336 x 14336 picture of the "
        "28 x 28 test images (205,520,896 pixels); at most 4,194,304 (2048 x 2048): lower grid or scale"
    )
    assert not (digits / "metrics/toy/render").exists()


def test_render_at_the_largest_picture_stays_small(digits):
    """grid 24 x scale 3 on 28 x 28 digits: a 2016 x 2016 picture, just under the bound."""
    set_render(digits, grid=24, scale=3)
    code = (
        "import resource, runpy, sys; sys.argv = ['render', 'toy']\n"
        "try: runpy.run_module('pipeline.render', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e: assert e.code in (0, None), e.code\n"
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=digits,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.split("peak")[-1]) / 1024
    print(f"render at grid 24, scale 3 (2016 x 2016): peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 1536
    assert (digits / "metrics/toy/render/overlay_grid.png").exists()


def test_the_default_pictures_are_within_the_bound():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    sizes = {"mnist": (28, 28), "stare": tuple(raw["stare"]["prepare"]["image_size"])}
    tasks = {"mnist": "multiclass", "stare": "binary"}
    for dataset, (height, width) in sizes.items():
        settings = params.parse_section(render.RenderParams, raw[dataset]["render"], f"{dataset}.render")
        settings.check_picture(f"{dataset}.render", tasks[dataset], height, width)
