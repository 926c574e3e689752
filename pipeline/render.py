"""Pictures of what the model predicts on the test split: ``python -m pipeline.render <dataset>``.

Writes ``metrics/<dataset>/render/``, replaced as a whole, at the operating point evaluate released the model at
(data/models/<dataset>/release.pt), so that the pictures agree with the metrics. The drawing, for each task:
pipeline/figures.py.
"""

from __future__ import annotations

from pipeline.stage import answer_help

answer_help(__name__, __doc__)  # before the imports below load torch

from dataclasses import dataclass

from pipeline.checkpoint import check_input_channels, load_model, released_evaluation
from pipeline.figures import RENDERERS
from pipeline.params import PARAMS_FILE, load_params, require
from pipeline.prepared import open_split
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, run
from pipeline.tasks import TASKS

# matplotlib needs about 130 bytes per pixel drawn: this keeps render's peak near 1 GiB.
MAX_PICTURE_SIDE = 2048
MAX_PICTURE_PIXELS = MAX_PICTURE_SIDE**2


@dataclass(frozen=True)
class RenderParams:
    grid: int = 10  # a grid x grid mosaic of test images
    alpha: float = 0.5  # opacity of the predicted mask over the image
    scale: int = 4  # each image pixel becomes scale x scale screen pixels
    batch_size: int = 16  # images per forward pass
    # A binary task's picture wider than this is drawn reduced, with a full-size detail beside (figures.py):
    # 448 px, so that `dvc plots diff` of three revisions fits 1,400 px.
    max_width: int = 448

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(1 <= self.grid <= 32, f"{key}.grid", f"must be in [1, 32], got {self.grid}")
        require(0 <= self.alpha <= 1, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        require(1 <= self.scale <= 16, f"{key}.scale", f"must be in [1, 16], got {self.scale}")
        require(self.max_width >= 64, f"{key}.max_width", f"must be >= 64, got {self.max_width}")

    def check_picture(self, key: str, task: str, height: int, width: int) -> None:
        """Refuse a picture of ``height`` x ``width`` test images over MAX_PICTURE_PIXELS, unless one image at
        scale 1 is that large already."""
        tiles = TASKS[task].mosaic_side(self.grid)
        h, w = tiles * height * self.scale, tiles * width * self.scale
        settings = f"grid {self.grid} x scale {self.scale}" if tiles > 1 else f"scale {self.scale}"
        require(
            h * w <= max(MAX_PICTURE_PIXELS, height * width),
            key,
            f"{settings} draws a {h} x {w} picture of the {height} x {width} test images ({h * w:,} pixels); "
            f"at most {MAX_PICTURE_PIXELS:,} ({MAX_PICTURE_SIDE} x {MAX_PICTURE_SIDE}): lower "
            f"{'grid or scale' if tiles > 1 else 'scale'}",
        )


def render(dataset: str) -> str:
    """Draw ``metrics/<dataset>/render/`` from the checkpoint, its release and the test split."""
    paths = DatasetPaths(dataset)
    settings = load_params(dataset, "render", RenderParams)
    device = setup(0)
    model_file, model = load_model(paths, device)
    meta = model_file.plan.meta
    task = TASKS[meta.task]
    test = open_split(paths.prepared, "test")
    check_input_channels(model_file, test.channels, test.where)
    # From the index, before any image is read: the size the pictures will be drawn at.
    settings.check_picture(f"{PARAMS_FILE}: {dataset}.render", meta.task, *task.drawn_size(test.sizes, settings.grid))
    RENDERERS[meta.task](model, meta, test, settings, released_evaluation(paths, model_file), device, paths)
    return f"render {dataset}: pictures of the test predictions -> {paths.metrics / 'render'}"


if __name__ == "__main__":
    run(render)
