"""How much a human had to change a prediction: the measure of effort saved."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .label_config import Box

MATCH_IOU = 0.5  # a drawn box and a predicted box this close are the same object
KEEP_IOU = 0.75  # closer than this, the human did not need to move it


def iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    inter_h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = inter_w * inter_h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Effort:
    """Counts of what happened to each box between our prediction and the human's final annotation."""

    kept: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    added: int = 0
    iou_sum: float = 0.0

    @property
    def predicted(self) -> int:
        return self.kept + self.moved + self.relabelled + self.deleted

    @property
    def final(self) -> int:
        return self.kept + self.moved + self.relabelled + self.added

    @property
    def touched(self) -> int:
        """Boxes a human had to touch: missed, wrong label, IoU under KEEP_IOU, plus false boxes."""
        return self.moved + self.relabelled + self.deleted + self.added

    @property
    def acceptance(self) -> float:
        """Share of predicted boxes kept as they were."""
        return self.kept / self.predicted if self.predicted else 1.0

    @property
    def touched_per_box(self) -> float:
        return self.touched / self.final if self.final else float(self.touched > 0)

    def __add__(self, other: "Effort") -> "Effort":
        return Effort(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def as_dict(self) -> dict:
        return {**asdict(self), "predicted": self.predicted, "final": self.final, "touched": self.touched,
                "acceptance": self.acceptance, "touched_per_box": self.touched_per_box}


def compare(predicted: list[Box], final: list[Box]) -> Effort:
    """Match boxes greedily by IoU, then classify every prediction and every final box once."""
    pairs = sorted(((iou(p, f), i, j) for i, p in enumerate(predicted) for j, f in enumerate(final)), reverse=True)
    return match_greedily(pairs, predicted, final, MATCH_IOU, KEEP_IOU)


def match_greedily(pairs, predicted: list, final: list, match: float, keep: float,
                   higher_is_closer: bool = True) -> Effort:
    """Pair regions closest first (pairs: closeness, predicted index, final index, sorted closest first) and count.

    Closeness is an overlap (higher is closer; the pair's IoU is summed) or a distance (lower is closer).
    """
    used_p, used_f, effort = set(), set(), Effort()
    for closeness, i, j in pairs:
        if (closeness < match) if higher_is_closer else (closeness > match):
            break
        if i in used_p or j in used_f:
            continue
        used_p.add(i)
        used_f.add(j)
        effort.iou_sum += closeness if higher_is_closer else 0.0
        if predicted[i].label != final[j].label:
            effort.relabelled += 1
        elif (closeness < keep) if higher_is_closer else (closeness > keep):
            effort.moved += 1
        else:
            effort.kept += 1
    effort.deleted = len(predicted) - len(used_p)
    effort.added = len(final) - len(used_f)
    return effort
