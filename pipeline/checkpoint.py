"""The model checkpoint: the trained weights, the architecture that holds them, and the classes they predict.

``data/models/<dataset>/model.pt`` is ``{"model": {"arch", "in_channels", "out_channels", "width"},
"state_dict": {...}, "dataset": <meta.json's content>}``, written by train and read by evaluate and render,
which rebuild the network without knowing which dataset it was trained on. It is loaded with
``torch.load(weights_only=True)`` -- tensors and plain containers, never pickled code -- and checked before
anything large is built: its zip members before torch reads them (:func:`check_torch_file`: nothing compressed,
nothing declared beyond the file), then a known architecture of sane size whose outputs fit its class list,
exactly the tensors that architecture has, with the shapes it expects, all finite.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from pipeline.atomic import write_torch
from pipeline.models import ARCHITECTURES, build_model
from pipeline.prepared import DatasetMeta, check_zip, error_reason, load_meta
from pipeline.stage import DatasetPaths, StageError

# Far above anything trained here (widths 4-64, 1-3 channels, 11 classes), below a width that would allocate
# gigabytes before the state dict could be compared with it (vgg_unet: 0.8 GiB of weights at width 256, 12.8 GiB
# at 1024). train.width is bounded by the same limit.
MODEL_LIMITS = {"in_channels": 64, "out_channels": 1024, "width": 256}


# What torch.save writes, in a zip archive under one folder: the pickle, each storage's bytes, a few bytes of
# metadata. A storage is bounded by the file; the pickle, which the unpickler turns into Python objects, by this
# (a resume state of the widest U-Net with 1,000 epochs of curves pickles to 0.1 MB).
MAX_PICKLE_BYTES = 16 << 20
TORCH_MEMBERS = [
    (r"[^/]+/data/\d+", math.inf),
    (r"[^/]+/data\.pkl", MAX_PICKLE_BYTES),
    (r"[^/]+/(\.format_version|\.storage_alignment|byteorder|version|\.data/serialization_id|\.data/version)", 1024),
]


class CheckpointError(StageError):
    """A checkpoint is missing, unreadable, or does not hold the network it says it does."""


def check_torch_file(path: str | os.PathLike, kind: str = "model checkpoint written by train") -> None:
    """Refuse a torch file whose members could make torch.load allocate more than the file holds: torch inflates
    a compressed member whole, and allocates a storage by the size its record declares, before anything can
    check what it holds (see :func:`pipeline.prepared.check_zip`)."""
    members = [member.filename for member in check_zip(path, TORCH_MEMBERS, kind, CheckpointError)]
    folder = next((name.split("/")[0] for name in members if name.endswith("/data.pkl")), None)
    if stray := next((name for name in members if name.split("/")[0] != folder), None):
        raise CheckpointError(f"{path}: unexpected member {stray} in a {kind}")


def input_channels(model: nn.Module) -> int:
    """The channels of the images the network reads: the input of its first convolution, the first layer of
    both architectures."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def check_input_channels(model: nn.Module, path: str | os.PathLike, channels: int, data: str | os.PathLike) -> None:
    """Refuse to run the model at ``path`` on ``data``'s images of ``channels`` channels unless it reads as many."""
    if (expected := input_channels(model)) != channels:
        raise CheckpointError(
            f"{path}: the model reads {expected}-channel images, but {data} holds "
            f"{channels}-channel images; rerun train"
        )


def save_checkpoint(path: str | os.PathLike, model_config: dict, state_dict: dict, meta: DatasetMeta) -> None:
    write_torch(path, {"model": model_config, "state_dict": state_dict, "dataset": vars(meta)})


def _check_config(config: object, path: str | os.PathLike) -> dict:
    if not isinstance(config, dict) or set(config) != {"arch", *MODEL_LIMITS}:
        raise CheckpointError(
            f"{path}: 'model' must be a mapping of arch, {', '.join(MODEL_LIMITS)}; got {config!r:.80}"
        )
    if config["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {config['arch']!r}; known: {sorted(ARCHITECTURES)}")
    for key, limit in MODEL_LIMITS.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise CheckpointError(f"{path}: model {key} must be an integer in [1, {limit}], got {value!r}")
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


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, DatasetMeta]:
    """Rebuild the trained network from a checkpoint; returns ``(model, meta)``. Never unpickles code."""
    try:
        check_torch_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; run the train stage first") from None
    except CheckpointError:
        raise
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a model checkpoint written by train ({error_reason(e)})") from None
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"model", "state_dict", "dataset"}:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected a mapping of model, state_dict, dataset; got {found}")
    config = _check_config(checkpoint["model"], path)
    try:
        meta = DatasetMeta(**checkpoint["dataset"])
        meta.check(f"{path}: dataset")
    except TypeError as e:
        raise CheckpointError(f"{path}: 'dataset' is not a dataset description: {e}") from None
    if config["out_channels"] != meta.model_outputs:  # else predict writes confident labels of classes that are not
        raise CheckpointError(
            f"{path}: the network has {config['out_channels']} output channels, but its {meta.task} "
            f"task with classes {meta.classes} needs {meta.model_outputs} (one logit for a binary "
            "task, one per class for a multiclass one)"
        )
    model = build_model(config)
    _check_state_dict(model, checkpoint["state_dict"], path)
    model.load_state_dict(checkpoint["state_dict"])
    # Channels-last like the inputs (pipeline.inference.to_input): oneDNN convolutions run faster that way.
    return model.to(device, memory_format=torch.channels_last).eval(), meta


def load_model(paths: DatasetPaths, device: torch.device | str) -> tuple[nn.Module, DatasetMeta]:
    """The dataset's trained network, refusing one trained on a different class list than the prepared data."""
    meta = load_meta(paths.prepared)
    model, trained = load_checkpoint(paths.model, device)
    if (trained.task, trained.classes) != (meta.task, meta.classes):
        raise CheckpointError(
            f"{paths.model}: trained for a {trained.task} task with classes {trained.classes}, but "
            f"{paths.prepared} holds a {meta.task} task with classes {meta.classes}; rerun train"
        )
    return model, meta
