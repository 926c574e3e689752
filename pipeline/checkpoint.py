"""The model file: ``format``, ``model`` (the config build_model takes), ``plan`` and ``state_dict``; evaluate's
``release.pt`` adds ``evaluation``. Read with ``torch.load(weights_only=True)`` once its zip members are checked,
every part validated before anything large is built; a file that fails is one :class:`CheckpointError` line.
Layout and reasons: docs/inference.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.atomic import write_torch
from pipeline.inference import TTA
from pipeline.models import ARCHITECTURES, build_model
from pipeline.prepared import DatasetMeta, check_zip, error_reason, load_meta
from pipeline.stage import DatasetPaths, StageError, dataset_name

FORMAT = "segpipe-model/1"
# Far above anything trained here, below a width that would allocate gigabytes before the weights are checked.
MODEL_LIMITS = {"in_channels": 64, "out_channels": 1024, "width": 256}
MAX_PAD_MULTIPLE = 1024
MAX_BATCH_SIZE = 1 << 20
PLAN_KEYS = ("dataset", "task", "classes", "colors", "scale", "input_channels", "normalization", "pad_multiple")
EVALUATION_KEYS = ("threshold", "tta", "batch_size", "metrics")
WRITERS = {"train": "model checkpoint written by train", "evaluate": "released model written by evaluate"}
# torch.save's zip members: the pickle, each storage (bounded by the file), a few bytes of metadata.
MAX_PICKLE_BYTES = 16 << 20
TORCH_MEMBERS = [
    (r"[^/]+/data/\d+", math.inf),
    (r"[^/]+/data\.pkl", MAX_PICKLE_BYTES),
    (r"[^/]+/(\.format_version|\.storage_alignment|byteorder|version|\.data/serialization_id|\.data/version)", 1024),
]


class CheckpointError(StageError):
    """A model file is missing, unreadable, or does not hold the network it says it does."""


def check_torch_file(path: str | os.PathLike, kind: str = WRITERS["train"]) -> None:
    """Refuse a torch file whose members could make torch.load allocate more than the file holds."""
    members = [member.filename for member in check_zip(path, TORCH_MEMBERS, kind, CheckpointError)]
    folder = next((name.split("/")[0] for name in members if name.endswith("/data.pkl")), None)
    if stray := next((name for name in members if name.split("/")[0] != folder), None):
        raise CheckpointError(f"{path}: unexpected member {stray} in a {kind}")


def normalization(channels: int) -> dict:
    """The one normalisation train applies (pipeline.inference.to_input)."""
    return {"mean": [0.0] * channels, "std": [255.0] * channels}


def _integer(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{what} must be an integer in [{low}, {high}], got {value!r:.60}")
    return value


@dataclass(frozen=True)
class Plan:
    """How an image becomes the network's input, and the network's output the dataset's classes."""

    meta: DatasetMeta
    input_channels: int
    pad_multiple: int | None  # inputs are reflect-padded to multiples of it (the network's size_multiple)

    def to_dict(self) -> dict:
        m, channels = self.meta, self.input_channels
        values = (m.name, m.task, m.classes, m.colors, m.scale, channels, normalization(channels), self.pad_multiple)
        return dict(zip(PLAN_KEYS, values))

    @classmethod
    def from_dict(cls, plan: object, path: str | os.PathLike) -> Plan:
        if not isinstance(plan, dict) or set(plan) != set(PLAN_KEYS):
            raise CheckpointError(f"{path}: 'plan' must be a mapping of {', '.join(PLAN_KEYS)}; got {plan!r:.80}")
        meta = DatasetMeta(plan["dataset"], plan["task"], plan["classes"], plan["colors"], plan["scale"])
        try:
            dataset_name(meta.name, f"{path}: plan dataset")
            meta.check(f"{path}: plan")
        except StageError as e:  # the dataset description's own one line, as a model file's error
            raise CheckpointError(str(e)) from None
        channels = _integer(plan["input_channels"], 1, MODEL_LIMITS["in_channels"], f"{path}: plan input_channels")
        if plan["normalization"] != normalization(channels):
            raise CheckpointError(
                f"{path}: plan normalization {plan['normalization']!r:.80} is not one this segpipe applies "
                f"({normalization(channels)}: pixel / 255)"
            )
        multiple = _integer(plan["pad_multiple"], 1, MAX_PAD_MULTIPLE, f"{path}: plan pad_multiple")
        return cls(meta, channels, multiple)


@dataclass(frozen=True)
class Evaluation:
    """The operating point evaluate scored the model at (render and predict use it) and the headline scores."""

    threshold: float = 0.5  # a binary task's pixel is positive when its probability is above it
    tta: str = "none"  # pipeline.inference.TTA
    batch_size: int = 256  # images per forward pass: the same batches give the same bits
    metrics: dict = field(default_factory=dict)  # name -> number or None (undefined)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, evaluation: object, path: str | os.PathLike) -> Evaluation:
        keys = ", ".join(EVALUATION_KEYS)
        if not isinstance(evaluation, dict) or set(evaluation) != set(EVALUATION_KEYS):
            raise CheckpointError(f"{path}: 'evaluation' must be a mapping of {keys}; got {evaluation!r:.80}")
        threshold, tta, metrics = evaluation["threshold"], evaluation["tta"], evaluation["metrics"]
        if not isinstance(threshold, float) or not 0 < threshold < 1:
            raise CheckpointError(f"{path}: evaluation threshold must be a number in (0, 1), got {threshold!r:.60}")
        if not isinstance(tta, str) or tta not in TTA:
            raise CheckpointError(f"{path}: evaluation tta must be one of {list(TTA)}, got {tta!r:.60}")
        batch_size = _integer(evaluation["batch_size"], 1, MAX_BATCH_SIZE, f"{path}: evaluation batch_size")
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
            for k, v in metrics.items()
        ):
            raise CheckpointError(f"{path}: evaluation metrics must map names to numbers, got {metrics!r:.80}")
        return cls(threshold, tta, batch_size, metrics)


def _check_config(config: object, path: str | os.PathLike) -> dict:
    """A known arch, the channels, and every value MODEL_LIMITS lists in bounds, before anything is built."""
    if not isinstance(config, dict) or not {"arch", "in_channels", "out_channels"} <= set(config):
        raise CheckpointError(
            f"{path}: 'model' must be a mapping of arch, in_channels, out_channels and the architecture's "
            f"settings; got {config!r:.80}"
        )
    if not isinstance(config["arch"], str) or config["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {config['arch']!r:.60}; known: {sorted(ARCHITECTURES)}")
    for key, limit in MODEL_LIMITS.items():
        if key in config:
            _integer(config[key], 1, limit, f"{path}: model {key}")
    return config


def _check_state_dict(model: nn.Module, state_dict: object, path: str | os.PathLike) -> None:
    """Exactly the model's tensors, each of the expected shape and finite."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map names to tensors")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit a {type(model).__name__} of this configuration: "
            f"missing tensors {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the architecture needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values (a diverged training?)")


@dataclass(frozen=True)
class ModelFile:
    """A model file as read, every part checked."""

    path: Path
    config: dict
    plan: Plan
    state_dict: dict
    evaluation: Evaluation | None = None  # a release's; train's checkpoint has none

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with its weights, in evaluation mode on ``device``."""
        try:
            model = build_model(self.config)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: build_model does not take the model config {self.config!r:.80} ({error_reason(e)})"
            ) from None
        _check_state_dict(model, self.state_dict, self.path)
        if self.config["in_channels"] != self.plan.input_channels or model.size_multiple != self.plan.pad_multiple:
            raise CheckpointError(
                f"{self.path}: the plan (input_channels {self.plan.input_channels}, pad_multiple "
                f"{self.plan.pad_multiple}) does not fit the network (in_channels {self.config['in_channels']}, "
                f"size multiple {model.size_multiple})"
            )
        model.load_state_dict(self.state_dict)
        return model.to(device, memory_format=torch.channels_last).eval()

    def to_dict(self) -> dict:
        saved = {"format": FORMAT, "model": self.config, "plan": self.plan.to_dict()}
        if self.evaluation is not None:
            saved["evaluation"] = self.evaluation.to_dict()
        return {**saved, "state_dict": self.state_dict}


def save_checkpoint(path: str | os.PathLike, model_config: dict, state_dict: dict, meta: DatasetMeta) -> None:
    architecture = ARCHITECTURES.get(model_config.get("arch"))
    plan = Plan(meta, model_config["in_channels"], getattr(architecture, "size_multiple", None))
    write_torch(path, ModelFile(Path(path), model_config, plan, state_dict).to_dict())


def save_release(path: str | os.PathLike, trained: ModelFile, evaluation: Evaluation) -> None:
    write_torch(path, ModelFile(Path(path), trained.config, trained.plan, trained.state_dict, evaluation).to_dict())


def _read(path: Path, kind: str, missing: str) -> dict:
    try:
        check_torch_file(path, kind)
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found{missing}") from None
    except CheckpointError:
        raise
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a {kind} ({error_reason(e)})") from None
    keys = {"format", "model", "plan", "state_dict"}
    if not isinstance(saved, dict) or set(saved) not in (keys, keys | {"evaluation"}):
        if isinstance(saved, dict) and set(saved) == {"model", "state_dict", "dataset"}:
            raise CheckpointError(f"{path}: written by an earlier segpipe, without a plan; run the train stage again")
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(
            f"{path}: expected a mapping of format, model, plan, state_dict (and evaluation); got {found}"
        )
    if saved["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {saved['format']!r:.40}; this segpipe reads {FORMAT}")
    return saved


def load_model_file(path: str | os.PathLike, writer: str | None = "train") -> ModelFile:
    """Read and check the model file at ``path`` written by ``writer`` (None: any segpipe model file)."""
    path = Path(path)
    kind = WRITERS.get(writer, "segpipe model file")
    saved = _read(path, kind, f"; run the {writer} stage first" if writer else "")
    config = _check_config(saved["model"], path)
    plan = Plan.from_dict(saved["plan"], path)
    meta = plan.meta
    if config["out_channels"] != meta.model_outputs:
        raise CheckpointError(
            f"{path}: the network has {config['out_channels']} output channels, but its {meta.task} "
            f"task with classes {meta.classes} needs {meta.model_outputs} (one logit for a binary "
            "task, one per class for a multiclass one)"
        )
    evaluation = Evaluation.from_dict(saved["evaluation"], path) if "evaluation" in saved else None
    return ModelFile(path, config, plan, saved["state_dict"], evaluation)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, DatasetMeta]:
    model_file = load_model_file(path)
    return model_file.build(device), model_file.plan.meta


def release_path(paths: DatasetPaths) -> Path:
    return paths.model.with_name("release.pt")


def load_model(paths: DatasetPaths, device: torch.device | str) -> tuple[ModelFile, nn.Module]:
    """The dataset's trained model file and network, refusing one trained on other data."""
    meta = load_meta(paths.prepared)
    model_file = load_model_file(paths.model)
    model = model_file.build(device)
    trained = model_file.plan.meta
    if (trained.task, trained.classes) != (meta.task, meta.classes):
        raise CheckpointError(
            f"{paths.model}: trained for a {trained.task} task with classes {trained.classes}, but "
            f"{paths.prepared} holds a {meta.task} task with classes {meta.classes}; rerun train"
        )
    if trained.scale != meta.scale:
        raise CheckpointError(
            f"{paths.model}: trained on images resized by {trained.scale}, but {paths.prepared} holds images "
            f"resized by {meta.scale}; rerun train"
        )
    return model_file, model


def check_input_channels(model_file: ModelFile, channels: int, data: str | os.PathLike) -> None:
    if (expected := model_file.plan.input_channels) != channels:
        raise CheckpointError(
            f"{model_file.path}: the model reads {expected}-channel images, but {data} holds "
            f"{channels}-channel images; rerun train"
        )


def released_evaluation(paths: DatasetPaths, trained: ModelFile) -> Evaluation:
    """The operating point evaluate released ``trained`` at, if the release holds the same weights."""
    release = load_model_file(release_path(paths), "evaluate")
    if release.evaluation is None:
        raise CheckpointError(f"{release.path}: holds no evaluation; run the evaluate stage again")
    weights, other = trained.state_dict, release.state_dict
    same = release.config == trained.config and set(weights) == set(other)
    if not (same and all(torch.equal(weights[name], other[name]) for name in weights)):
        raise CheckpointError(f"{release.path}: holds other weights than {trained.path}; run the evaluate stage again")
    return release.evaluation
