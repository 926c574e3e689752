import pytest
import yaml

from pipeline import download, evaluate, params, render, train
from pipeline.datasets import mnist
from pipeline.params import ParamError, load_params

TRAIN = {"arch": "simple_unet", "width": 8, "epochs": 2, "batch_size": 16, "lr": 0.001}
SCHEMAS = {
    "download": download.DownloadParams,
    "train": train.TrainParams,
    "evaluate": evaluate.EvaluateParams,
    "render": render.RenderParams,
}


def write(tmp_path, section: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"mnist": section}))
    return path


def test_the_repository_params_are_valid():
    import importlib

    raw = params.read_params_file()
    for dataset, kind in raw["datasets"].items():
        prepare_schema = importlib.import_module(f"pipeline.datasets.{kind}").PrepareParams
        for stage in params.STAGES:
            load_params(dataset, stage, prepare_schema if stage == "prepare" else SCHEMAS[stage])


def test_defaults_and_nested_sections(tmp_path):
    path = write(tmp_path, {"train": {**TRAIN, "augment": {"affine": {"rotate": 5}}}})
    settings = load_params("mnist", "train", train.TrainParams, path)
    assert settings.augment.affine.rotate == 5.0 and settings.augment.affine.scale == (0.85, 1.15)
    assert settings.schedule == "constant"


@pytest.mark.parametrize(
    "stage, section, message",
    [
        ("train", {**TRAIN, "epochs": -1}, r"mnist\.train\.epochs: must be >= 1, got -1"),
        ("train", {**TRAIN, "epochs": 1.5}, r"mnist\.train\.epochs: expected an integer, got 1\.5"),
        ("train", {**TRAIN, "arch": "resnet"}, r"mnist\.train\.arch: must be one of"),
        ("train", {**TRAIN, "lr": "fast"}, r"mnist\.train\.lr: expected a finite number"),
        ("train", {**TRAIN, "epochz": 3}, r"mnist\.train\.epochz: unknown parameter"),
        ("train", {k: v for k, v in TRAIN.items() if k != "lr"}, r"mnist\.train\.lr: missing"),
        ("train", {**TRAIN, "augment": {"affine": {"scale": [1.2, 0.8]}}}, r"mnist\.train\.augment\.affine\.scale"),
        ("train", {**TRAIN, "seed": -1}, r"mnist\.train\.seed: must be in \[0, 2\*\*32\)"),
        ("train", {**TRAIN, "seed": 2**40}, r"mnist\.train\.seed: must be in \[0, 2\*\*32\)"),
        ("train", {**TRAIN, "patch_size": 30}, r"mnist\.train\.patch_size: must be a positive multiple of 4"),
        ("train", {**TRAIN, "arch": "vgg_unet", "patch_size": 40}, r"mnist\.train\.patch_size: .* multiple of 16"),
        ("train", {**TRAIN, "val_batch_size": 0}, r"mnist\.train\.val_batch_size: must be >= 1"),
        (
            "train",
            {**TRAIN, "patch_sampling": "vessels"},
            r"mnist\.train\.patch_sampling: must be one of \['uniform', 'foreground'\]",
        ),
        ("evaluate", {"tta": "flip"}, r"mnist\.evaluate\.tta: must be one of \['none', 'flips', 'dihedral'\]"),
        ("render", {"alpha": 2}, r"mnist\.render\.alpha: must be in \[0, 1\]"),
        ("evaluate", 5, r"mnist\.evaluate: expected a mapping, got 5"),
    ],
)
def test_bad_values_name_the_key(tmp_path, stage, section, message):
    path = write(tmp_path, {stage: section})
    with pytest.raises(ParamError, match=message) as error:
        load_params("mnist", stage, SCHEMAS[stage], path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"threshold": 1.0}, r"mnist\.prepare\.threshold: must be in \[0, 1\), got 1\.0"),
        ({"threshold": -0.1}, r"mnist\.prepare\.threshold: must be in \[0, 1\)"),
    ],
)
def test_a_dataset_declares_its_own_prepare_schema(tmp_path, section, message):
    path = write(tmp_path, {"prepare": section})
    with pytest.raises(ParamError, match=message):
        load_params("mnist", "prepare", mnist.PrepareParams, path)


def test_unknown_dataset(tmp_path):
    path = write(tmp_path, {"train": TRAIN})
    with pytest.raises(ParamError, match="cifar: not a dataset section .no such section.; datasets: \\['mnist'\\]"):
        load_params("cifar", "train", train.TrainParams, path)


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"mnist": "mnist"}, "mnist": 5}))
    with pytest.raises(ParamError, match="mnist: not a dataset section .got int 5"):
        load_params("mnist", "train", train.TrainParams, path)
    # The name-to-kind mapping is no dataset either: its entries are not stage sections.
    with pytest.raises(ParamError, match=r"datasets\.mnist: unknown stage section"):
        load_params("datasets", "train", train.TrainParams, path)


def test_a_misspelled_stage_section_is_an_error(tmp_path):
    path = write(tmp_path, {"train": TRAIN, "evalute": {"batch_size": 8}})
    with pytest.raises(ParamError, match=r"mnist\.evalute: unknown stage section"):
        load_params("mnist", "train", train.TrainParams, path)
