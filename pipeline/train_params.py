"""``<ds>.train`` in params.yaml, and whether the prepared data and this machine can train what it asks for.

Every refusal is a ParamError naming the key: one line before anything is built or launched.
"""

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
# Threads beyond the cores only wait on each other; a few per core are allowed so that a run can be reproduced,
# bit for bit, on a smaller machine (docs/training.md, "Threads").
THREADS_PER_CORE = 4
# A world size, all nodes together: a run of one's own torchrun may exceed this machine's cores.
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
    # None: one pass over the training images, or with patch_size, enough patches to cover each one's scored
    # area once (epoch_samples)
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
        self._validate_model(key)
        self._validate_optimisation(key)
        self._validate_sampling(key)
        self._validate_runtime(key)

    def _validate_model(self, key: str) -> None:
        require(self.arch in ARCHITECTURES, f"{key}.arch", f"must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")
        require(
            self.width <= MODEL_LIMITS["width"],
            f"{key}.width",
            f"must be in [1, {MODEL_LIMITS['width']}] (the widest network a checkpoint may hold), got {self.width}",
        )

    def _validate_optimisation(self, key: str) -> None:
        require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.loss in LOSSES, f"{key}.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        require(
            self.schedule in SCHEDULES, f"{key}.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}"
        )

    def _validate_sampling(self, key: str) -> None:
        multiple = ARCHITECTURES[self.arch].size_multiple
        require(
            self.patch_size is None or (self.patch_size > 0 and self.patch_size % multiple == 0),
            f"{key}.patch_size",
            f"must be a positive multiple of {multiple} ({self.arch}'s input size multiple) "
            f"or null, got {self.patch_size}",
        )
        require(
            self.patch_sampling in PATCH_SAMPLING,
            f"{key}.patch_sampling",
            f"must be one of {list(PATCH_SAMPLING)}, got {self.patch_sampling!r}",
        )
        require(self.val_batch_size >= 1, f"{key}.val_batch_size", f"must be >= 1, got {self.val_batch_size}")
        require(0 <= self.seed < 2**32, f"{key}.seed", f"must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        require(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            f"{key}.samples_per_epoch",
            f"must be >= 1 or null, got {self.samples_per_epoch}",
        )

    def _validate_runtime(self, key: str) -> None:
        require(
            self.threads is None or self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}"
        )
        if self.threads is not None:
            cores = usable_cores()
            require(
                self.threads <= THREADS_PER_CORE * cores,
                f"{key}.threads",
                f"must be at most {THREADS_PER_CORE * cores} ({THREADS_PER_CORE} per usable core, {cores} here: "
                f"more threads than that wait on each other) or null, got {self.threads}",
            )
        require(self.processes >= 1, f"{key}.processes", f"must be >= 1, got {self.processes}")
        require(
            self.processes <= MAX_PROCESSES,
            f"{key}.processes",
            f"must be at most {MAX_PROCESSES} (the world size, all nodes together), got {self.processes}",
        )
        require(
            self.batch_size % self.processes == 0,
            f"{key}.batch_size",
            f"must be a multiple of processes ({self.processes}): it is the global batch, split evenly among "
            f"them, got {self.batch_size}",
        )
        require(
            self.precision in amp.PRECISIONS,
            f"{key}.precision",
            f"must be one of {list(amp.PRECISIONS)}, got {self.precision!r}",
        )

    def check_launch(self, key: str) -> None:
        """Before launching ``processes`` workers on this machine: one GPU each, or a few per usable core."""
        if torch.cuda.is_available():
            limit, why = torch.cuda.device_count(), f"one per GPU, {torch.cuda.device_count()} here"
        else:
            limit, why = THREADS_PER_CORE * usable_cores(), f"{THREADS_PER_CORE} per usable core, {usable_cores()} here"
        require(
            self.processes <= limit,
            f"{key}.processes",
            f"must be at most {limit} to run on this machine ({why}), got {self.processes}",
        )

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
    """Samples per epoch: ``samples_per_epoch`` if given; else, for patches, per image its scored area over a
    patch's, rounded up; else one per image."""
    if settings.samples_per_epoch is not None:
        return settings.samples_per_epoch
    if settings.patch_size is None:
        return len(split)
    areas = fov_box_areas(split) if split.has_fov else [h * w for h, w in split.sizes]
    return sum(max(1, -(-area // settings.patch_size**2)) for area in areas)


def activation_bytes(config: dict, height: int, width: int) -> int:
    """Bytes of the activations one image of ``height`` x ``width`` leaves for the backward pass: the output of
    every layer in a forward pass on the meta device, where nothing is allocated."""
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
    """Refuse a batch whose activations alone (a lower bound of a step's needs) exceed the memory available now
    (a GPU's per process): it could only fail, or draw the kernel's OOM killer onto the machine."""
    available = available_memory()
    if available is None:
        return
    multiple = ARCHITECTURES[settings.arch].size_multiple
    height, width = (
        (settings.patch_size,) * 2
        if settings.patch_size
        else [-(-side // multiple) * multiple for side in split.largest]
    )
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
    """Refuse, naming the key, a loss that does not fit the task, images or patches the network cannot take, a
    batch that cannot fit in memory, or an epoch whose last batch has fewer samples than there are processes."""
    build_loss(settings.loss, meta.task, f"{key}.loss")
    check_image_sizes(settings, split, key)
    check_memory(settings, meta, split, key)
    last = epoch_samples(settings, split) % settings.batch_size
    if 0 < last < settings.processes:
        raise ParamError(
            f"{key}.processes: an epoch's last batch has {last} samples, fewer than the {settings.processes} "
            f"processes that share each batch; change batch_size or samples_per_epoch"
        )
