"""``<ds>.train`` in params.yaml, and whether the prepared data and this machine can train what it asks for
(every refusal a one-line ParamError naming the key, before anything is built)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import precision as amp
from pipeline.augment import AugmentParams
from pipeline.checkpoint import MODEL_LIMITS
from pipeline.losses import LOSSES, build_loss
from pipeline.models import ARCHITECTURES, build_model
from pipeline.params import ParamError, require
from pipeline.prepared import DatasetMeta, PreparedSplit
from pipeline.runtime import available_memory, usable_cores

PATCH_SAMPLING = ("uniform", "foreground")
SCHEDULES = ("constant", "onecycle")
# A few threads per core, so that a run can be reproduced on a smaller machine (docs/training.md, "Threads").
THREADS_PER_CORE = 4
MAX_PROCESSES = 1024


@dataclass(frozen=True)
class TrainParams:
    arch: str
    width: int
    epochs: int
    batch_size: int
    lr: float
    loss: str = "cross_entropy"  # a name in pipeline.losses.LOSSES that fits the task
    schedule: str = "constant"  # "onecycle": warm-up then cosine decay to lr/1e4, stepped every batch
    weight_decay: float = 0.0
    patch_size: int | None = None  # None: whole images; else random square crops of this size
    # "uniform": patches anywhere; "foreground": around a foreground pixel inside the field of view.
    patch_sampling: str = "uniform"
    # None: one pass over the images, or enough patches to cover each one's scored area once (epoch_samples)
    samples_per_epoch: int | None = None
    augment: AugmentParams = field(default_factory=AugmentParams)
    val_batch_size: int = 256  # images per forward pass when scoring the validation split after each epoch
    seed: int = 0
    # torch's intra-op threads per process; None: the usable cores shared out among this machine's processes.
    # Part of the arithmetic: 1 and 2 threads give different weights.
    threads: int | None = None
    # Data-parallel processes; batch_size is the global batch. Under a torchrun of one's own, its world size.
    processes: int = 1
    precision: str = "auto"  # auto, fp32, bf16 or fp16: the forward's arithmetic (pipeline/precision.py)

    def validate(self, key: str) -> None:
        def check(name: str, ok: bool, message: str) -> None:
            require(ok, f"{key}.{name}", message)

        def at_least(low: int, *names: str) -> None:
            for name in names:
                check(name, getattr(self, name) >= low, f"must be >= {low}, got {getattr(self, name)}")

        def one_of(name: str, known) -> None:
            check(name, getattr(self, name) in known, f"must be one of {list(known)}, got {getattr(self, name)!r}")

        one_of("arch", sorted(ARCHITECTURES))
        at_least(1, "width")
        limit = MODEL_LIMITS["width"]
        message = f"must be in [1, {limit}] (the widest network a checkpoint may hold), got {self.width}"
        check("width", self.width <= limit, message)
        at_least(1, "epochs", "batch_size")
        check("lr", self.lr > 0, f"must be > 0, got {self.lr}")
        at_least(0, "weight_decay")
        one_of("loss", LOSSES)
        one_of("schedule", SCHEDULES)
        multiple = ARCHITECTURES[self.arch].size_multiple
        check(
            "patch_size",
            self.patch_size is None or (self.patch_size > 0 and self.patch_size % multiple == 0),
            f"must be a positive multiple of {multiple} ({self.arch}'s input size multiple) or null, "
            f"got {self.patch_size}",
        )
        one_of("patch_sampling", PATCH_SAMPLING)
        at_least(1, "val_batch_size")
        check("seed", 0 <= self.seed < 2**32, f"must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        for name in ("samples_per_epoch", "threads"):
            value = getattr(self, name)
            check(name, value is None or value >= 1, f"must be >= 1 or null, got {value}")
        if self.threads is not None:
            cores = usable_cores()
            check(
                "threads",
                self.threads <= THREADS_PER_CORE * cores,
                f"must be at most {THREADS_PER_CORE * cores} ({THREADS_PER_CORE} per usable core, {cores} here: "
                f"more threads than that wait on each other) or null, got {self.threads}",
            )
        at_least(1, "processes")
        message = f"must be at most {MAX_PROCESSES} (the world size, all nodes together), got {self.processes}"
        check("processes", self.processes <= MAX_PROCESSES, message)
        check(
            "batch_size",
            self.batch_size % self.processes == 0,
            f"must be a multiple of processes ({self.processes}): it is the global batch, split evenly among "
            f"them, got {self.batch_size}",
        )
        one_of("precision", amp.PRECISIONS)

    def check_launch(self, key: str) -> None:
        """Before launching ``processes`` workers on this machine: one GPU each, or a few per usable core."""
        if torch.cuda.is_available():
            limit, why = torch.cuda.device_count(), f"one per GPU, {torch.cuda.device_count()} here"
        else:
            limit, why = THREADS_PER_CORE * usable_cores(), f"{THREADS_PER_CORE} per usable core, {usable_cores()} here"
        message = f"must be at most {limit} to run on this machine ({why}), got {self.processes}"
        require(self.processes <= limit, f"{key}.processes", message)

    def model_config(self, channels: int, outputs: int) -> dict:
        """The network's config as the checkpoint stores it."""
        return {"arch": self.arch, "in_channels": channels, "out_channels": outputs, "width": self.width}


def fov_box_areas(split: PreparedSplit) -> list[int]:
    """Per image, the area of the bounding box of its field of view (what lies outside is never scored)."""
    areas = []
    for _, samples in split.batches(256, ("fov",)):
        for sample in samples:
            rows, cols = np.flatnonzero(sample.fov.any(axis=1)), np.flatnonzero(sample.fov.any(axis=0))
            areas.append(int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) if len(rows) else 0)
    return areas


def epoch_samples(settings: TrainParams, split: PreparedSplit) -> int:
    """``samples_per_epoch`` if given; else, for patches, per image its scored area over a patch's, rounded up."""
    if settings.samples_per_epoch is not None:
        return settings.samples_per_epoch
    if settings.patch_size is None:
        return len(split)
    areas = fov_box_areas(split) if split.has_fov else [h * w for h, w in split.sizes]
    return sum(max(1, -(-area // settings.patch_size**2)) for area in areas)


def activation_bytes(config: dict, height: int, width: int) -> int:
    """Bytes of the activations one image leaves for the backward pass (every layer's output, on the meta device)."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output.numel() * output.element_size() if isinstance(output, torch.Tensor) else 0

    with torch.device("meta"):
        model = build_model(config).eval()  # the same outputs; training batch norm refuses one value per channel
        for module in model.modules():
            if not any(module.children()):
                module.register_forward_hook(count)
        model(torch.empty(1, config["in_channels"], height, width))
    return total


def check_memory(settings: TrainParams, meta: DatasetMeta, split: PreparedSplit, key: str) -> None:
    """Refuse a batch whose activations alone exceed the memory available now (a GPU's per process)."""
    available = available_memory()
    if available is None:
        return
    multiple = ARCHITECTURES[settings.arch].size_multiple
    sides = [-(-side // multiple) * multiple for side in split.largest]
    height, width = (settings.patch_size,) * 2 if settings.patch_size else sides
    per_image = activation_bytes(settings.model_config(split.channels, meta.model_outputs), height, width)
    share = settings.processes if torch.cuda.is_available() else 1  # a GPU each, or the processes share the memory
    images = min(settings.batch_size, epoch_samples(settings, split)) // share  # a batch holds at most an epoch
    if per_image * images > available:
        raise ParamError(
            f"{key}.batch_size: {images} images of {height}x{width} per step need at least "
            f"{per_image * images / 2**20:,.1f} MiB of activations ({per_image / 2**20:,.2f} MiB each), "
            f"more than the {available / 2**20:,.1f} MiB available here: at most "
            f"{max(1, available // per_image) * share}"
        )


def check_image_sizes(settings: TrainParams, split: PreparedSplit, key: str) -> None:
    """Refuse images the network cannot take whole, and patches larger than the images."""
    multiple = ARCHITECTURES[settings.arch].size_multiple
    height, width = split.largest
    if settings.patch_size is None and not split.uniform:
        raise ParamError(
            f"{key}.patch_size: the training images have {len(set(split.sizes))} sizes and a batch "
            f"stacks images of one size; train on patches (patch_size) instead of whole images"
        )
    if settings.patch_size is None and (height % multiple or width % multiple):
        raise ParamError(
            f"{key}.patch_size: the images are {height}x{width} and {settings.arch} takes sides that "
            f"are multiples of {multiple}; train on patches (patch_size) instead of whole images"
        )
    # A patch larger than every image is mostly padding, and an absurd one pads each sample to gigabytes.
    largest = -(-max(height, width) // multiple) * multiple
    if settings.patch_size is not None and settings.patch_size > largest:
        raise ParamError(
            f"{key}.patch_size: {settings.patch_size} is larger than the training images ({height}x{width}); "
            f"at most {largest}"
        )


def check_fits(settings: TrainParams, meta: DatasetMeta, split: PreparedSplit, key: str) -> None:
    build_loss(settings.loss, meta.task, f"{key}.loss")
    check_image_sizes(settings, split, key)
    check_memory(settings, meta, split, key)
    last = epoch_samples(settings, split) % settings.batch_size
    if 0 < last < settings.processes:
        raise ParamError(
            f"{key}.processes: an epoch's last batch has {last} samples, fewer than the {settings.processes} "
            f"processes that share each batch; change batch_size or samples_per_epoch"
        )
