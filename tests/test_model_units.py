"""Fast checks of the pure parts: label config parsing, box conversion, the version registry, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.dataset import yolo_rows
from model.label_config import Box, ConfigError, parse_label_config
from model.predictor import image_uncertainty
from model.registry import ProjectRegistry
from tests.conftest import REPO

CONFIG = ('<View><Image name="img" value="$photo"/><RectangleLabels name="boxes" toName="img">'
          '<Label value="Person" predicted_values="Normal,Fall"/><Label value="Car"/></RectangleLabels></View>')


def test_config_names_image_key_labels_and_mappings():
    control = parse_label_config(CONFIG)
    assert (control.name, control.to_name, control.value_key) == ("boxes", "img", "photo")
    assert control.labels == ("Person", "Car")
    assert control.model_label_map({0: "normal", 1: "FALL", 2: "car", 3: "bus"}) == {0: "Person", 1: "Person", 2: "Car"}
    assert control.model_label_map({0: "Person", 1: "Normal"}, aliases=False) == {0: "Person"}


def test_config_errors_say_what_is_missing():
    with pytest.raises(ConfigError, match="value='\\$key'"):
        parse_label_config('<View><Image name="i" value="image"/><RectangleLabels name="l" toName="i"><Label value="a"/></RectangleLabels></View>')
    with pytest.raises(ConfigError, match="not an <Image>"):
        parse_label_config('<View><Image name="i" value="$image"/><RectangleLabels name="l" toName="x"><Label value="a"/></RectangleLabels></View>')
    with pytest.raises(ConfigError, match="empty"):
        parse_label_config("  ")


def test_regions_round_trip_and_rotation_and_unknown_labels():
    control = parse_label_config(CONFIG)
    region = control.to_region(Box("Car", 64, 48, 192, 144, 0.9), 640, 480)
    assert region["value"] | {} == {"x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0, "rotation": 0,
                                   "rectanglelabels": ["Car"]}
    boxes, unknown = control.from_result([region, {**region, "value": {**region["value"], "rectanglelabels": ["Bike"]}}])
    assert boxes == [Box("Car", 64, 48, 192, 144, 0.9)] and unknown == ["Bike"]
    rotated = {**region, "value": {**region["value"], "rotation": 90}}
    [box], _ = control.from_result([rotated])
    assert (round(box.x1), round(box.y1), round(box.x2), round(box.y2)) == (0, 48, 64, 176)
    rows, _ = yolo_rows({"result": [region]}, control, (640, 480))
    assert rows == ["1 0.200000 0.200000 0.200000 0.200000"]


def test_uncertainty_is_highest_for_coin_flips():
    assert image_uncertainty([]) == 0.0
    assert image_uncertainty([0.99, 0.5]) == pytest.approx(1.0)
    assert image_uncertainty([0.9]) == pytest.approx(0.2)


def _version(registry: ProjectRegistry, tmp_path, content: bytes, current: bool, **meta):
    weights = tmp_path / "w.pt"
    weights.write_bytes(content)
    return registry.add(weights, {"labels": ["a"], **meta}, make_current=current)


def test_registry_switches_atomically_keeps_rejected_prunes_and_rolls_back(tmp_path):
    registry = ProjectRegistry(tmp_path / "models", 3)
    assert registry.current() is None and registry.versions() == []
    v1 = _version(registry, tmp_path, b"one", True)
    v2 = _version(registry, tmp_path, b"two", False, reason="worse")
    v3 = _version(registry, tmp_path, b"three", True)
    assert [v.name for v in registry.versions()] == ["v1", "v2", "v3"]
    assert registry.current_name() == "v3" and registry.current().weights.read_bytes() == b"three"
    assert registry.get("v2").meta["status"] == "rejected" and registry.get("v1").meta["status"] == "superseded"
    assert not list(registry.versions_dir.glob(".staging-*"))
    assert registry.rollback().name == "v1"  # the newest served version before v3, skipping the rejected v2
    assert registry.current_name() == "v1"
    registry.set_current("v3")
    _version(registry, tmp_path, b"four", True)
    assert registry.prune(keep=2) == ["v1", "v2"]
    assert not registry.get("v1").weights.exists() and registry.get("v1").meta["status"] == "pruned"
    assert registry.get("v4").weights.exists() and registry.get("v3").weights.exists()
    with pytest.raises(ValueError):
        registry.set_current("v1")
    assert [v.number for v in registry.versions()] == [1, 2, 3, 4]
    assert v1.name == "v1" and v2.name == "v2" and v3.name == "v3"


def test_cli_lists_versions_and_rolls_back(tmp_path):
    registry = ProjectRegistry(tmp_path / "models", 5)
    _version(registry, tmp_path, b"one", True)
    _version(registry, tmp_path, b"two", True)
    env = {"MODEL_DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "ls_backend", *args], cwd=REPO, env=env,
                                       capture_output=True, text=True, timeout=60)
    listed = run("versions", "--project", "5")
    assert listed.returncode == 0 and "* v2" in listed.stdout
    rolled = run("rollback", "--project", "5")
    assert rolled.returncode == 0 and "now serves v1" in rolled.stdout
    assert json.loads((tmp_path / "models" / "5" / "current.json").read_text())["version"] == "v1"
    assert run("rollback", "--project", "5", "--version", "v9").returncode == 1


def test_an_idle_refinement_of_choices_is_served_only_when_it_scores_higher(tmp_path):
    from types import SimpleNamespace

    from model.pipeline import judge
    from model.registry import Version

    parent = Version("v1", tmp_path, {"labels": ["a", "b"]})
    scored = lambda fitness: (lambda: SimpleNamespace(fitness=fitness))  # noqa: E731
    # A new version with new annotations may tie (or lose within the noise of 2 tasks) and still be served ...
    assert judge(parent, ["a", "b"], 1.0, 2, True, scored(1.0))[0]
    assert judge(parent, ["a", "b"], 0.95, 2, True, scored(1.0))[0]
    # ... a refinement on the same annotations must be measurably better: a tie keeps the served version.
    accepted, reason, _, gain = judge(parent, ["a", "b"], 1.0, 2, True, scored(1.0), must_gain=True)
    assert not accepted and gain == 0.0 and reason.endswith("no gain")
    assert judge(parent, ["a", "b"], 0.9, 2, True, scored(0.5), must_gain=True)[0]
