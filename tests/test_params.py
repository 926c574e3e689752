import pytest
import yaml

from pipeline import params
from pipeline.params import ParamError

TRAIN = {"arch": "simple_unet", "width": 8, "epochs": 2, "batch_size": 16, "lr": 0.001}


def write(tmp_path, section: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"mnist": section}))
    return path


def test_the_repository_params_are_valid():
    raw = params.read_params_file()
    for dataset in raw["datasets"]:
        for stage in ("download", "prepare", "train", "evaluate", "render"):
            params.load(dataset, stage)


def test_defaults_and_nested_sections(tmp_path):
    path = write(tmp_path, {"train": {**TRAIN, "augment": {"affine": {"rotate": 5}}}})
    train = params.load("mnist", "train", path)
    assert train.augment.affine.rotate == 5.0 and train.augment.affine.scale == (0.85, 1.15)
    assert train.schedule == "constant"


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
        ("prepare", {"threshold": 1.0}, r"mnist\.prepare\.threshold: must be in \[0, 1\), got 1\.0"),
        ("prepare", {"threshold": -0.1}, r"mnist\.prepare\.threshold: must be in \[0, 1\)"),
        ("render", {"alpha": 2}, r"mnist\.render\.alpha: must be in \[0, 1\]"),
    ],
)
def test_bad_values_name_the_key(tmp_path, stage, section, message):
    path = write(tmp_path, {stage: section})
    with pytest.raises(ParamError, match=message) as error:
        params.load("mnist", stage, path)
    assert str(error.value).startswith(str(path))


def test_unknown_dataset(tmp_path):
    path = write(tmp_path, {"train": TRAIN})
    with pytest.raises(ParamError, match="no section for dataset 'cifar'"):
        params.load("cifar", "train", path)
