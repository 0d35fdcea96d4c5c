"""The training policy: size from the objects, cores, served thresholds, idle refinement, pretrained head rows."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from model import compute, policy
from model.label_config import Box, parse_label_config
from model.policy import NEVER, Thresholds
from model.thresholds import HeldOutImage, effort_at, learn
from model.yolo_import import label_config


def test_small_objects_get_a_larger_training_size_than_the_budget_alone_gives():
    budget_only = policy.choose_imgsz(45, 8, 100, [640] * 8, [200.0] * 40, threads=2, gpu=False)
    small = policy.choose_imgsz(45, 8, 100, [640] * 8, [16.0] * 40, threads=2, gpu=False)
    assert small > budget_only and small * 16 / 640 >= policy.MIN_OBJECT_PX
    # Large photos with small people: the size follows the objects, within the CPU's cap.
    assert policy.choose_imgsz(45, 8, 100, [1920] * 8, [50.0] * 40, 2, False) == 928
    assert policy.choose_imgsz(45, 8, 100, [1920] * 8, [5.0] * 40, 2, False) == policy.MAX_IMGSZ_CPU
    # Small images are enlarged only as far as their small objects need, at most MAX_UPSCALE.
    assert policy.choose_imgsz(0, 8, 100, [400] * 8, [20.0] * 40, 2, False) == 480
    assert policy.choose_imgsz(0, 8, 100, [400] * 8, [2.0] * 40, 2, False) == 800
    # More time buys a larger size; a heavier model a smaller one.
    assert policy.choose_imgsz(240, 8, 100, [640] * 8, [80.0] * 40, 2, False) == 640
    assert policy.choose_imgsz(240, 8, 100, [640] * 8, [80.0] * 40, 2, False, model_cost=4.2) < 640


def test_training_uses_every_core_and_gives_one_back_while_serving():
    cores = compute.cores()
    assert compute.training_threads() == cores
    seen = []
    with compute.serving():
        assert compute.training_threads() == max(1, cores - 1)
        worker = threading.Thread(target=lambda: (compute.use_training_threads(), seen.append(_threads())))
        worker.start()
        worker.join()
    compute.use_training_threads()
    assert seen == [max(1, cores - 1)] and _threads() == cores


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def test_a_real_training_run_trains_on_every_core(tmp_path, backend_env, bccd_dataset, backbone_weights):
    """The training thread's torch thread count, read inside Ultralytics' own batch loop."""
    from model.trainer import TrainPlan, train

    backend_env()
    seen: list[int] = []
    from ultralytics import YOLO

    original = YOLO.add_callback

    def spy(self, event, func):
        original(self, event, func)
        if event == "on_train_batch_start":
            original(self, event, lambda trainer: seen.append(_threads()))
    YOLO.add_callback = spy
    try:
        train(bccd_dataset, backbone_weights, tmp_path / "run", TrainPlan(1, 64, 0, 2, 0))
    finally:
        YOLO.add_callback = original
    assert seen and set(seen) == {compute.cores()}


def test_a_run_writes_its_checkpoint_once_when_it_ends_not_after_every_pass(tmp_path, backend_env, bccd_dataset,
                                                                              backbone_weights):
    """Counted with Ultralytics' own on_model_save event, for a run of fixed passes and one stopped by its budget."""
    from ultralytics import YOLO

    from model.trainer import TrainPlan, checkpoint_model, train

    backend_env()
    saves: list[int] = []
    original = YOLO.add_callback

    def spy(self, event, func):
        original(self, event, func)
        if event == "on_train_batch_start":  # added once per run, by the trainer
            original(self, "on_model_save", lambda trainer: saves.append(trainer.epoch))
    YOLO.add_callback = spy
    try:
        weights, _ = train(bccd_dataset, backbone_weights, tmp_path / "fixed", TrainPlan(3, 64, 0, 2, 0))
        assert saves == [2] and checkpoint_model(weights) is not None
        saves.clear()
        weights, _ = train(bccd_dataset, backbone_weights, tmp_path / "timed", TrainPlan(10_000, 64, 0, 2, 4.0))
    finally:
        YOLO.add_callback = original
    assert len(saves) <= 1 and checkpoint_model(weights) is not None


def test_a_cpu_run_trains_channels_last_and_writes_a_checkpoint_that_predicts(tmp_path, backend_env, bccd_dataset,
                                                                             backbone_weights):
    """The convolutions' layout read inside Ultralytics' batch loop; the checkpoint stays NCHW, so fusing works."""
    import torch
    from ultralytics import YOLO

    from model.trainer import TrainPlan, checkpoint_model, train

    backend_env()
    layouts: list[tuple[bool, bool]] = []
    original = YOLO.add_callback

    def first_conv(network) -> torch.Tensor:
        return next(m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)

    def conv_layouts(trainer) -> None:
        layouts.append(tuple(first_conv(network).is_contiguous(memory_format=torch.channels_last)
                             for network in (trainer.model, trainer.ema.ema)))

    def spy(self, event, func):
        original(self, event, func)
        if event == "on_train_batch_start":
            original(self, "on_train_batch_end", conv_layouts)
    YOLO.add_callback = spy
    try:
        weights, _ = train(bccd_dataset, backbone_weights, tmp_path / "run", TrainPlan(1, 64, 0, 2, 0), device="cpu")
    finally:
        YOLO.add_callback = original
    assert layouts and set(layouts) == {(True, True)}
    saved = [p for p in checkpoint_model(weights).parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert saved and all(p.is_contiguous() for p in saved)
    image = next((bccd_dataset.parent / "images" / "val").iterdir())
    assert YOLO(str(weights)).predict(str(image), imgsz=64, verbose=False)[0].boxes is not None


def _image(predicted: list[tuple[str, float, float]], truth: list[str]) -> HeldOutImage:
    """Boxes on a diagonal: predicted (label, score, offset) land on truth box i when offset is 0."""
    boxes = [Box(label, 100 * i, 0, 100 * i + 50, 50) for i, label in enumerate(truth)]
    found = [Box(label, 100 * i + off, 0, 100 * i + 50 + off, 50, score)
             for i, (label, score, off) in enumerate(predicted)]
    return HeldOutImage(found, boxes)


def test_boxes_that_cost_more_than_drawing_are_not_served():
    # Every predicted box is in the wrong place: serving any costs a deletion plus the drawing it was meant to save.
    images = [_image([("cat", 0.9, 200), ("cat", 0.8, 200)], ["cat", "cat"]) for _ in range(3)]
    thresholds, evidence = learn(images, ["cat"], 0.25)
    assert thresholds.default == NEVER and evidence["withheld_labels"] == ["cat"]
    assert evidence["touched"] == evidence["touched_if_none_served"] == 6
    # Right boxes are served, at a threshold that keeps the true ones.
    good = [_image([("cat", 0.9, 0), ("cat", 0.6, 0)], ["cat", "cat"]) for _ in range(3)]
    thresholds, evidence = learn(good, ["cat"], 0.25)
    assert thresholds.default <= 0.6 and evidence["touched"] == 0


def test_boxes_are_served_only_on_confident_evidence_of_a_saving():
    # Held-out images without a box say nothing about serving: none is served.
    assert learn([HeldOutImage([], []) for _ in range(2)], ["cat"], 0.25)[0].default == NEVER
    # On few held-out images, boxes come in clusters: three right boxes could be one easy image's luck; five are
    # evidence. From THIN_LABELS_FOLLOW_FROM_IMAGES images on, the bound is the narrower SERVE_Z.
    assert learn([_image([("cat", 0.9, 0)], ["cat"]) for _ in range(3)], ["cat"], 0.25)[0].of("cat") == NEVER
    assert learn([_image([("cat", 0.9, 0)], ["cat"]) for _ in range(5)], ["cat"], 0.25)[0].of("cat") <= 0.9
    assert policy.serve_z(2) > policy.serve_z(policy.THIN_LABELS_FOLLOW_FROM_IMAGES) == policy.SERVE_Z
    # A label seen only as false boxes is withheld while the label that pays is served.
    images = [_image([("cat", 0.9, 0), ("dog", 0.9, 300)], ["cat", "dog"]) for _ in range(5)]
    thresholds, evidence = learn(images, ["cat", "dog"], 0.25)
    assert thresholds.of("cat") < NEVER and thresholds.of("dog") == NEVER and evidence["withheld_labels"] == ["dog"]


def test_a_shared_threshold_earned_by_withheld_labels_serves_nothing():
    # Six labels with one right box each clear the bound together; alone, one box is no evidence, and each is
    # withheld. What is left to serve is 'cow', never seen on the held-out images: nothing says its boxes pay.
    labels = ["a", "b", "c", "d", "e", "f"]
    images = [_image([(label, 0.9, 0) for label in half], half) for half in (labels[:3], labels[3:])]
    thresholds, evidence = learn(images, [*labels, "cow"], 0.25)
    assert thresholds.default == NEVER and evidence["withheld_labels"] == [*labels, "cow"]


def test_on_enough_held_out_images_a_thin_label_follows_the_shared_threshold_unless_seen_to_cost():
    # Every image has a right cat; one has the only dog (right) and one the only cow (a false box).
    def images(n: int) -> list[HeldOutImage]:
        found = [_image([("cat", 0.9, 0)], ["cat"]) for _ in range(n - 2)]
        return found + [_image([("cat", 0.9, 0), ("dog", 0.9, 0)], ["cat", "dog"]),
                        _image([("cat", 0.9, 0), ("cow", 0.9, 300)], ["cat", "cow"])]
    few, enough = (learn(images(n), ["cat", "dog", "cow"], 0.25)[0]
                   for n in (6, policy.THIN_LABELS_FOLLOW_FROM_IMAGES))
    # On six images one right dog is no confident saving; on ten the dog follows the cats' threshold.
    assert few.of("cat") < NEVER and few.of("dog") == NEVER and few.of("cow") == NEVER
    assert enough.of("dog") == enough.of("cat") < NEVER and enough.of("cow") == NEVER


def test_a_label_with_enough_held_out_boxes_gets_its_own_threshold():
    # 'dog' boxes are all false at 0.5; 'cat' boxes right at 0.4. One shared threshold cannot serve both well.
    images = [HeldOutImage(
        [Box("cat", 0, 0, 50, 50, 0.4), Box("dog", 500, 500, 550, 550, 0.5)],
        [Box("cat", 0, 0, 50, 50), Box("dog", 200, 200, 250, 250)]) for _ in range(policy.MIN_BOXES_PER_CLASS)]
    thresholds, _ = learn(images, ["cat", "dog"], 0.25)
    assert thresholds.of("dog") > 0.5 and thresholds.of("cat") <= 0.4  # no false dog is served
    assert effort_at(images, thresholds).touched == policy.MIN_BOXES_PER_CLASS  # only the missed dogs
    assert Thresholds.from_meta({"thresholds": thresholds.as_dict()}, 0.25) == thresholds
    assert Thresholds.from_meta({"conf": 0.4}, 0.25) == Thresholds(0.4, {})


def test_the_not_worse_margin_is_wide_on_few_held_out_images_and_narrows():
    margins = [policy.worse_margin(n) for n in (1, 2, 5, 20, 100, 10_000)]
    assert margins == sorted(margins, reverse=True)
    assert margins[1] > 0.05 and margins[-1] == policy.TOLERANCE


def test_labels_the_base_knows_keep_their_pretrained_head_rows(person_weights):
    import copy

    import torch
    from ultralytics import YOLO

    from model.pipeline import known_rows, model_names
    from model.trainer import keep_known_rows

    config = label_config(["car", "person"]).replace('<Label value="person"/>',
                                                      '<Label value="person" predicted_values="Fall,Normal"/>')
    names = model_names(YOLO(str(person_weights)).model)
    rows = known_rows(parse_label_config(config), names)
    assert rows == {1: min(i for i, n in names.items() if n in ("Fall", "Normal"))}
    base = YOLO(str(person_weights)).model
    new = copy.deepcopy(base)
    for branch in new.model[-1].cv3:
        torch.nn.init.normal_(branch[-1].weight)
    keep_known_rows(new, base, rows)
    for branch, base_branch in zip(new.model[-1].cv3, base.model[-1].cv3):
        assert torch.equal(branch[-1].weight[1], base_branch[-1].weight[rows[1]])
        assert not torch.equal(branch[-1].weight[0], base_branch[-1].weight[0])


def _version(registry, number: int, **meta) -> None:
    from model.registry import write_json

    path = registry.versions_dir / f"v{number}"
    path.mkdir(parents=True)
    (path / "weights.pt").write_bytes(b"w")
    write_json(path / "meta.json", {"version": f"v{number}", "trained_upto": 1e12, **meta})


def test_idle_refinement_rounds_go_on_while_they_gain_and_stop_when_one_does_not(backend_env, tmp_path):
    from ls_backend.backend import Backend
    from ls_backend.jobs import next_run
    from ls_backend.settings import get_settings

    backend_env(refine_time_budget=100, refine_rounds=3, train_time_budget=10)
    backend = Backend(get_settings())

    def history(project: str, *rounds: tuple[int, str, float]) -> object:
        registry = backend.registry(project)
        _version(registry, 1, status="current", refined=False)
        registry.set_current("v1")
        for number, (done, status, gain) in enumerate(rounds, start=2):
            _version(registry, number, status=status, refined=True, refine_round=done, gain=gain)
            if status == "current":
                registry.set_current(f"v{number}")
        return next_run(backend, project, False)

    assert history("1") == ("refine", 100, 1)
    assert history("2", (1, "current", 0.05)) == ("refine", 100, 2)
    assert history("3", (1, "current", 0.05), (2, "current", 0.001)) is None  # gained too little
    assert history("4", (1, "rejected", -0.2)) is None  # a worse round ends it
    assert history("5", (1, "current", 0.05), (2, "current", 0.05), (3, "current", 0.05)) is None  # all rounds done
    assert next_run(backend, "5", True) == ("full", 100, 1)  # the Train button always trains


def test_refinement_rounds_after_the_first_are_served_only_when_they_gain():
    from model.pipeline import judge
    from model.policy import refinement_must_gain

    assert not refinement_must_gain("detect", 1) and not refinement_must_gain("segment", 1)
    assert refinement_must_gain("detect", 2) and refinement_must_gain("pose", 3)
    assert refinement_must_gain("classify", 1)  # a classifier's refinement only overfits unless it gains

    class Parent:
        name, meta = "v2", {"labels": ["a"]}

    class Scores:
        fitness = 0.50
    # Slightly lower on 6 held-out tasks: within the noise margin a round-1 refinement is served, a round-2 one not.
    assert judge(Parent(), ["a"], 0.48, 6, True, Scores, must_gain=refinement_must_gain("detect", 1))[0]
    assert not judge(Parent(), ["a"], 0.48, 6, True, Scores, must_gain=refinement_must_gain("detect", 2))[0]


@pytest.fixture(scope="module")
def bccd_dataset(tmp_path_factory) -> Path:
    """A four-image YOLO dataset from the shared bccd set."""
    from tests.conftest import shared_file
    from model.yolo_import import class_names, read_dataset

    root = shared_file("datasets", "bccd")
    out = tmp_path_factory.mktemp("bccd-yolo")
    names = class_names(root)
    items = [i for i in read_dataset(root) if i.split == "train"][:4]
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for item in items[:3] if split == "train" else items[3:]:
            (out / "images" / split / item.image.name).symlink_to(item.image)
            rows = [f"{c} {(a + b) / 2} {(y + z) / 2} {b - a} {z - y}" for c, a, y, b, z in item.rows]
            (out / "labels" / split / f"{item.image.stem}.txt").write_text("\n".join(rows) + "\n")
    import yaml

    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out), "train": "images/train", "val": "images/val",
                                                   "names": dict(enumerate(names))}))
    return out / "data.yaml"


def test_the_status_page_says_when_boxes_are_held_back_and_on_how_many_tasks(make_client, person_weights):
    client = make_client()
    registry = client.app.state.backend.registry("1")
    evidence = {"images": 2, "boxes": 30, "touched": 41, "touched_if_none_served": 30, "withheld_labels": ["cat", "dog"]}
    registry.add(person_weights, {"labels": ["cat", "dog"], "annotations": 10, "held_out_tasks": 2,
                                  "metrics": {"map50": 0.1}, "threshold_evidence": evidence,
                                  "thresholds": {"default": NEVER, "per_label": {}}}, make_current=True)
    page = client.get("/projects/1/").text
    assert "none: on 2 held-out tasks, served boxes would leave 41 to touch against 30 to draw" in page
    assert "<td>2</td>" in page  # the held-out tasks the figures rest on
    [version] = client.get("/versions?project=1").json()["details"]
    assert version["held_out_tasks"] == 2 and version["threshold_evidence"]["images"] == 2


def test_the_learning_rate_falls_as_classes_grow():
    assert policy.learning_rate(1) == pytest.approx(0.002)
    assert policy.learning_rate(10) < policy.learning_rate(3) < policy.learning_rate(1)


def test_few_shot_runs_keep_the_pretrained_backbone_and_train_the_rest(tmp_path, backend_env, bccd_dataset,
                                                                       backbone_weights):
    import torch

    from model.trainer import TrainParams, backbone_layers, checkpoint_model, plan, train

    base = checkpoint_model(backbone_weights)
    assert backbone_layers(base) == 10
    chosen = plan(TrainParams(epochs=1, imgsz=64, time_budget=0), 4, [640], [40.0], backbone=backbone_layers(base))
    assert chosen.freeze == 10
    assert plan(TrainParams(epochs=1, imgsz=64, time_budget=0, freeze=0), 4, [640], [40.0], backbone=10).freeze == 0
    weights, _ = train(bccd_dataset, backbone_weights, tmp_path / "run", chosen)
    trained = checkpoint_model(weights).float()
    base = base.float()
    assert torch.equal(trained.model[0].conv.weight, base.model[0].conv.weight)  # the backbone is kept
    assert not torch.equal(trained.model[-1].cv2[0][0].conv.weight, base.model[-1].cv2[0][0].conv.weight)  # the head learned
