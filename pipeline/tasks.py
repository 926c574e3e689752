"""The kinds of segmentation task, ``TASKS[meta.task]``: one object owns what differs between binary and multiclass.

Imports nothing, so that any module may ask a task. Design: docs/inference.md, "Tasks".
"""

from __future__ import annotations


class Multiclass:
    """Softmax over the classes, background first: a pixel is its most probable class."""

    classes: int | None = None  # how many classes it must have; None: any
    default_classes: tuple[str, ...] | None = None  # None: the names must be given
    probability_map = False  # predict writes, render draws, the foreground's probability
    human_baseline = False  # a second annotator's masks are scored like the model

    def model_outputs(self, num_classes: int) -> int:
        return num_classes

    def output_names(self, stem: str, overlay_format: str) -> list[str]:
        """The files predict writes for its input ``stem``."""
        return [f"{stem}.png", f"{stem}_overlay.{overlay_format}"]

    def foreground(self, logits):
        """Per pixel of float (B, K, H, W) logits, the probability of any class but background."""
        return 1 - logits.softmax(dim=1)[:, 0]

    def mosaic_side(self, grid: int) -> int:
        """Test images per side of a render picture."""
        return grid

    def drawn_size(self, sizes: list[tuple[int, int]], grid: int) -> tuple[int, int]:
        """The (H, W) render draws test images of ``sizes`` at: the largest among the mosaic's first grid x grid."""
        shown = sizes[: grid**2]
        return max(h for h, _ in shown), max(w for _, w in shown)


class Binary(Multiclass):
    """One logit: class 1 (foreground) where its sigmoid is above the operating threshold."""

    classes = 2
    default_classes = ("background", "foreground")
    probability_map = True
    human_baseline = True

    def model_outputs(self, num_classes: int) -> int:
        return 1

    def output_names(self, stem: str, overlay_format: str) -> list[str]:
        return [*super().output_names(stem, overlay_format), f"{stem}_prob.png"]

    def foreground(self, logits):
        return logits[:, 0].sigmoid()

    def mosaic_side(self, grid: int) -> int:
        return 1  # each image alone

    def drawn_size(self, sizes: list[tuple[int, int]], grid: int) -> tuple[int, int]:
        """The largest image (by pixels): it makes the largest picture."""
        return max(sizes, key=lambda size: size[0] * size[1])


TASKS = {"multiclass": Multiclass(), "binary": Binary()}
