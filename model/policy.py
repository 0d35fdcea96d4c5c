"""The training policy in one place: how large and how long to train, when a version is better, which boxes pay.

Every number here is a documented default (README, "How it learns"); the settings that override some of them live
in ls_backend/settings.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# -- image size -------------------------------------------------------------------------------------------------
MIN_OBJECT_PX = 24  # the median labeled box's shorter side at the training size; smaller objects are not learned
MAX_IMGSZ_CPU = 1024  # a larger size leaves a CPU too few passes within any budget a user waits for
MAX_IMGSZ_GPU = 1280
MIN_IMGSZ = 160
MAX_UPSCALE = 2.0  # small objects in small images may be enlarged this much, never more
SIZE_STEP = 32  # YOLO's largest stride: sizes are multiples of it

# Seconds one image takes through one training pass at 320 px on one CPU thread with the YOLOv5n-sized reference
# model (measured on this project's 2-core machines: bccd at 640 px, 50 passes over 10 images in 120 s on two
# threads); cost grows with the square of the image size and with the model's size. GPUs are taken to be 20x faster.
CPU_THREAD_SECONDS_PER_IMAGE_320 = 0.12
REFERENCE_PARAMETERS = 2.65e6  # YOLOv5n
FROZEN_BACKBONE_COST = 0.7  # a pass with the backbone frozen costs this share of a full one (measured 0.51-0.85 over
#                            30 passes at k=10 on bccd, aquarium, construction-ppe, trees-aerial)


def target_epochs(n_train: int) -> int:
    """Few images need many passes to be learned; many images need fewer."""
    return max(20, min(100, 800 // max(1, n_train)))


def seconds_per_image(imgsz: int, threads: int, gpu: bool, model_cost: float = 1.0) -> float:
    per_image = CPU_THREAD_SECONDS_PER_IMAGE_320 / max(1, threads) * (imgsz / 320) ** 2 * model_cost
    return per_image / (20 if gpu else 1)


def _round_up(size: float) -> int:
    return int(math.ceil(size / SIZE_STEP) * SIZE_STEP)


def object_imgsz(image_sides: list[int], box_sides: list[float]) -> int:
    """The training size at which the median labeled box is MIN_OBJECT_PX on its shorter side.

    image_sides are the images' longest sides and box_sides the boxes' shorter sides, both in original pixels.
    """
    if not image_sides or not box_sides:
        return 0
    longest = sorted(image_sides)[len(image_sides) // 2]
    box = max(1.0, sorted(box_sides)[len(box_sides) // 2])
    return _round_up(longest * MIN_OBJECT_PX / box)


def size_cap(image_sides: list[int], wanted_by_objects: int, gpu: bool) -> int:
    """The images' own size, enlarged only as far as small objects need (and MAX_UPSCALE allows)."""
    longest = sorted(image_sides)[len(image_sides) // 2] if image_sides else 640
    own = _round_up(longest)
    upscaled = min(wanted_by_objects, _round_up(longest * MAX_UPSCALE))
    return max(MIN_IMGSZ, min(MAX_IMGSZ_GPU if gpu else MAX_IMGSZ_CPU, max(own, upscaled)))


def choose_imgsz(budget: float, n_train: int, epochs: int, image_sides: list[int], box_sides: list[float],
                 threads: int, gpu: bool, model_cost: float = 1.0) -> int:
    """The largest size at which the wanted passes fit the budget, but never below what the objects need."""
    needed = object_imgsz(image_sides, box_sides)
    cap = size_cap(image_sides, needed, gpu)
    sizes = range(cap, MIN_IMGSZ - 1, -SIZE_STEP)
    if budget <= 0:
        return cap
    fits = [s for s in sizes if seconds_per_image(s, threads, gpu, model_cost) * n_train * epochs <= budget]
    by_budget = fits[0] if fits else MIN_IMGSZ
    return min(cap, max(by_budget, needed, MIN_IMGSZ))


def learning_rate(classes: int) -> float:
    """AdamW's lr0: 0.002 for one class, less as classes grow (the shape of Ultralytics' own auto rule, at its scale).

    Measured at k=10 on 2 cores: a fixed 0.004 made construction-ppe (10 classes) diverge (mAP50 0.009, against
    0.076 at 0.0007); halving 0.02/(4 + classes) raised the first version on four of five sets and left the
    settled one level (README, "Training levers").
    """
    return 0.01 / (4 + max(1, classes))


# -- judging versions -------------------------------------------------------------------------------------------
TOLERANCE = 0.005  # the least fitness difference ever taken to mean 'worse'
NOISE_PER_IMAGE = 0.1  # the spread of fitness between held-out sets of one image; it shrinks with sqrt(images)
REFINE_MIN_GAIN = 0.005  # an idle refinement round that gains less than this (fitness) ends the rounds
# Kinds whose idle refinement rounds are served only when they score higher on the held-out tasks, not merely no
# worse: a choices head on a frozen backbone learns ten images within the quick update, and a longer run on the same
# images only overfits, which a few held-out tasks (all right either way) cannot see. Measured with
# bench/fewshot_kinds.py (bccd cell crops, k=10, top-1 on 39 held-out crops): quick update 0.974, after two
# refinement rounds served as "not worse" 0.897.
REFINE_MUST_GAIN = frozenset({"classify"})
# From this refinement round on, every kind's round is served only when it scores higher. The first round gives a
# 45 s quick version five times its training at a size of its own and is expected to be better, so it is judged
# 'not worse' (the margin keeps a better one from being rejected by the luck of two held-out images); a later round
# only trains the same labels longer, so a round that does not gain has nothing to offer but the chance of being
# worse. Seen in bench/fewshot.py (trees-aerial, k=25): round 2 scored lower on the 6 held-out tasks, was served
# within the margin and withheld every box; on 12 held-out images it was lower too (mAP50 0.454 against 0.486,
# touched per box 1.00 against 0.986).
REFINE_MUST_GAIN_FROM_ROUND = 2


def refinement_must_gain(task: str, refine_round: int) -> bool:
    """Whether an idle refinement round must score higher than the served version, not merely no worse."""
    return task in REFINE_MUST_GAIN or refine_round >= REFINE_MUST_GAIN_FROM_ROUND


def worse_margin(held_out_images: int) -> float:
    """How much lower a new version may score on the same held-out images and still be served.

    On two images a score is mostly luck: demanding 'not worse' to the third decimal there rejects better
    versions (more data, longer training) by chance, so while the held-out set is small the margin is wide.
    """
    return max(TOLERANCE, NOISE_PER_IMAGE / math.sqrt(max(1, held_out_images)))


# -- which boxes to serve ---------------------------------------------------------------------------------------
THRESHOLDS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10 .. 0.90
# Two predicted boxes of one label overlapping more than this are one object (NMS). Ultralytics' 0.7 leaves a
# few-shot model's near-duplicates to be deleted by hand. Measured with bench/serve_rules.py (200 draws of the
# backend's held-out tasks, k = 10 and 50), touched per ground-truth box at 0.7 -> 0.5: bccd 0.824 -> 0.823 and
# 0.623 -> 0.621, aquarium 1.001 either way and 0.927 -> 0.917, construction-ppe 0.994 -> 0.993 and 0.940 -> 0.931,
# pothole-seg 1.005 -> 1.003 and 0.980 -> 0.970, trees-aerial (dense crowns) 0.996 and 0.969 either way.
NMS_IOU = 0.5
NEVER = 1.01  # a threshold no box reaches: serve none of that class
MIN_BOXES_PER_CLASS = 20  # held-out boxes a class needs before it gets a threshold of its own
# From this many held-out images on, a label with too few boxes for a threshold of its own follows the shared one
# unless its boxes were seen to cost there (more false than kept); on fewer images it needs a confident saving of
# its own. Measured with bench/serve_rules.py (200 draws of 10 held-out images from 60, k=50 models), touched per
# ground-truth box: bccd 0.618 -> 0.613, aquarium 0.922 -> 0.911, construction-ppe 0.962 -> 0.950, pothole-seg
# (one label) 0.940 either way; at 2 held-out images the same rule cost (construction-ppe k=10: draws worse than
# drawing 4% -> 9%).
THIN_LABELS_FOLLOW_FROM_IMAGES = 10
SERVE_Z = 1.0  # boxes are served only where the held-out saving minus this many spreads stays above zero. Measured
#                (100 draws of 2 held-out images from 60, k=10 models on bccd, aquarium, construction-ppe, trees-aerial):
#                the old best-on-held-out rule served boxes costing more than drawing in 33-99% of draws on the three
#                weak models (touched/GT 1.02-1.12); this bound in at most 5% (touched/GT <= 1.002), bccd 0.82 -> 0.84
# On fewer than THIN_LABELS_FOLLOW_FROM_IMAGES held-out images, the shared threshold and all that is served together
# need this many spreads (each label's own share still SERVE_Z): boxes cluster by image, and two easy images whose
# three boxes were all kept passed SERVE_Z, then cost more than drawing on the project's other images (pothole-seg
# up to 1.23 touched per box). Measured with bench/serve_rules.py (200 draws of the held-out tasks from 60 images;
# README, "Which boxes to serve"): at k=10 (2 tasks), ten models of five sets, draws costing more than drawing 4.9%
# -> 0.7% on the mean, touched per box 0.951 -> 0.959; at k=25 (5 tasks), five models, 3.0% -> 1.8%, 0.923 -> 0.936.
SERVE_Z_FEW_IMAGES = 2.0


# While a version has fewer held-out tasks than this, idle cross-check folds (model/crosscheck.py) train the same
# recipe with other labeled tasks held out, until the thresholds rest on this many tasks. Measured with
# bench/serve_rules.py (k=10 models, 200 draws of h of 60 held-out images, the product's rule at z=2), touched per
# ground-truth box with thresholds learned on 2 -> 10 images: bccd 0.832 -> 0.738, construction-ppe 0.982 -> 0.933,
# pothole-seg 1.000 -> 0.994, aquarium 1.000 -> 0.996, trees-aerial 1.000 either way (README, "Cross-checked
# thresholds").
CROSSCHECK_IMAGES = THIN_LABELS_FOLLOW_FROM_IMAGES
# A version trained after a finished cross-check borrows its folds' predictions of tasks it trains on while its own
# held-out tasks are fewer than CROSSCHECK_IMAGES, as long as each fold's model trained on at least this share of the
# version's human training tasks: fold models far behind the version lend it thresholds of a weaker recipe. Measured
# with bench/crosscheck_budget.py --grow 5 (versions on 13 tasks lent folds of 8, a share of 0.62; touched per box
# with their own two tasks -> lent folds: bccd 0.763 -> 0.696, construction-ppe 1.000 -> 0.959, pothole-seg 0.982 ->
# 1.000, serving nothing; README, "Folds lent to the next version"); folds trained a quarter as long, another kind
# of weaker model, lent bccd worse thresholds than its own two tasks gave (0.870 against 0.827, "How long a
# cross-check fold must train").
LEND_FOLDS_FROM_SHARE = 0.6
# The cross-checked version serves its own boxes and its fold models' fused (model/fusion.py): five models, each of
# which missed another group of tasks, agree on surer and tighter boxes than any one of them. Measured with
# bench/soup.py (k = 10, five fold models, 60 held-out images), touched per ground-truth box at the thresholds learned
# on the folds' pooled tasks, one fold model -> the five fused: bccd 0.758 -> 0.734, construction-ppe 0.968 -> 0.939,
# pothole-seg 0.982 -> 0.960, aquarium and trees-aerial 1.000 either way (nothing served); mAP50 rose on all five
# (+0.027 to +0.105). Averaging their weights instead (a soup) lowered mAP50 on four (README, "Fold models fused").
FUSE_IOU = 0.55  # a box joins a cluster of its label it overlaps this much (weighted boxes fusion's usual setting)
FUSE_MIN_SCORE = THRESHOLDS[0]  # members' boxes below the lowest threshold are not fused: the thresholds were learned
#                                 on the members' boxes from there up


def serve_z(held_out_images: int) -> float:
    """How many spreads a saving must clear on this many held-out images before its boxes are served."""
    return SERVE_Z_FEW_IMAGES if held_out_images < THIN_LABELS_FOLLOW_FROM_IMAGES else SERVE_Z


@dataclass(frozen=True)
class Thresholds:
    """The box threshold per label; a label at NEVER is not served because its boxes cost more than they save."""

    default: float
    per_label: dict[str, float]

    def of(self, label: str) -> float:
        return self.per_label.get(label, self.default)

    def as_dict(self) -> dict:
        return {"default": self.default, "per_label": self.per_label}

    @classmethod
    def from_meta(cls, meta: dict, fallback: float) -> "Thresholds":
        data = meta.get("thresholds") or {}
        default = data.get("default", meta.get("conf") or fallback)
        return cls(default, dict(data.get("per_label") or {}))


# -- self-training ----------------------------------------------------------------------------------------------
SELF_TRAINING_FROM_ROUND = 2  # refinement rounds from this one on also learn from pseudo-labeled unlabeled tasks
PSEUDO_MIN_BOX_SCORE = 0.5  # every served box of a pseudo-labeled image must be at least this sure: a served box the
#                             model is torn about would teach it its own doubt (boxes below the served thresholds are
#                             background to it either way)
PSEUDO_PER_LABELED = 3  # at most this many pseudo-labeled images per human-labeled one, so human labels keep weight
PSEUDO_MAX_IMAGES = 100  # and never more than this many in one round (each costs a prediction and training time)


def pseudo_label_quota(labeled: int) -> int:
    return min(PSEUDO_MAX_IMAGES, PSEUDO_PER_LABELED * labeled)


def every_label_served(thresholds: Thresholds, labels: list[str]) -> bool:
    """Pseudo-labels teach that whatever they leave out is background: sound only while no label is withheld.

    Seen in the bench: bccd k=10, WBC and Platelets withheld, 30 RBC-only pseudo-labeled images went into the served
    version, whose mAP50 was 0.54 against 0.51 for the first version before any refinement.
    """
    return all(thresholds.of(label) < NEVER for label in labels)


def usable_pseudo_label(prediction: dict) -> bool:
    """A served prediction confident enough to train on: boxes to learn, and none the model was unsure about."""
    scores = [region.get("score") or 0.0 for region in prediction.get("result") or []]
    return bool(scores) and min(scores) >= PSEUDO_MIN_BOX_SCORE


# -- polygons, choices, keypoints, rotated boxes ----------------------------------------------------------------------
CLASSIFY_IMGSZ = 224  # Ultralytics' classification size: a whole image answers one question, fine detail is not needed
MULTI_CHOICE_MIN = 0.3  # with choice="multiple", every class at least this probable is chosen (the top one always)
KEYPOINT_MIN_VISIBILITY = 0.5  # a predicted keypoint is shown only when the model thinks it is this likely visible
