"""Training losses by name (``<ds>.train.loss``), each for the tasks it fits: a value on a batch, and the sums it
is made of, which add up over parts of a batch (ranks, tiles). Pixels whose target is ``IGNORE`` count for
nothing. Adding one: docs/training.md, "Extending it".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import sum_over_ranks
from pipeline.params import ParamError

IGNORE = 255  # target value of pixels outside the field of view


class Loss:
    """A mean over the valid pixels of a batch, from ``sums`` that add up over parts of a batch."""

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.from_sums(self.sums(logits, target))

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(Loss):
    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE)

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="sum")
        return torch.stack([total, valid.sum().to(total.dtype)])

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[0] / sums[1]


class BinaryLoss(Loss):
    """Binary cross-entropy of the one logit, soft Dice of its sigmoid, or their sum."""

    def __init__(self, bce: bool, dice: bool):
        self.bce, self.dice = bce, dice

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != IGNORE).float()
        positive = (target == 1).float()
        logit = logits[:, 0]
        terms = []
        if self.bce:
            bce = F.binary_cross_entropy_with_logits(logit, positive, reduction="none")
            terms.append((bce * valid).sum() / valid.sum().clamp_min(1))
        if self.dice:
            prob = torch.sigmoid(logit) * valid
            terms.append(1 - (2 * (prob * positive).sum() + 1) / (prob.sum() + (positive * valid).sum() + 1))
        return sum(terms)

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The BCE, the valid pixels, and Dice's intersection and two sums."""
        valid = (target != IGNORE).float()
        positive = (target == 1).float()
        logit = logits[:, 0]
        bce = (F.binary_cross_entropy_with_logits(logit, positive, reduction="none") * valid).sum()
        prob = torch.sigmoid(logit) * valid
        return torch.stack([bce, valid.sum(), (prob * positive).sum(), prob.sum(), (positive * valid).sum()])

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        terms = []
        if self.bce:
            terms.append(sums[0] / sums[1].clamp_min(1))
        if self.dice:
            terms.append(1 - (2 * sums[2] + 1) / (sums[3] + sums[4] + 1))
        return sum(terms)


class MulticlassDice(Loss):
    """One minus the mean soft Dice of the softmax over the foreground classes (all but class 0)."""

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per class: the intersection, the predicted and the true sums (three vectors, one after the other)."""
        valid = (target != IGNORE).unsqueeze(1)
        classes = logits.shape[1]
        truth = F.one_hot(torch.where(valid[:, 0], target, 0).long(), classes).permute(0, 3, 1, 2) * valid
        prob = torch.softmax(logits, dim=1) * valid
        dims = (0, 2, 3)
        return torch.cat([(prob * truth).sum(dims), prob.sum(dims), truth.sum(dims).to(prob.dtype)])

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        intersection, predicted, true = sums.view(3, -1)[:, 1:]
        return 1 - ((2 * intersection + 1) / (predicted + true + 1)).mean()


# Name -> the loss of each task it fits; a name's tasks are those it has an entry for.
LOSSES: dict[str, dict[str, Loss]] = {
    "cross_entropy": {"multiclass": CrossEntropy()},
    "bce": {"binary": BinaryLoss(bce=True, dice=False)},
    "dice": {"binary": BinaryLoss(bce=False, dice=True), "multiclass": MulticlassDice()},
    "bce_dice": {"binary": BinaryLoss(bce=True, dice=True)},
}


def build_loss(name: str, task: str, key: str) -> Loss:
    """The loss ``name`` for a ``task`` ("binary" or "multiclass"); a ParamError naming ``key`` if it does not fit."""
    if task not in LOSSES[name]:
        fitting = [loss for loss, by_task in LOSSES.items() if task in by_task]
        listed = f"{', '.join(fitting[:-1])} or {fitting[-1]}" if len(fitting) > 1 else fitting[0]
        raise ParamError(f"{key}: a {task} task needs {listed}")
    return LOSSES[name][task]


def global_value(loss: Loss, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss`` over the global batch of all ranks, from differentiable all-reduced sums (docs/training.md)."""
    return loss.from_sums(sum_over_ranks(loss.sums(logits, target)))
