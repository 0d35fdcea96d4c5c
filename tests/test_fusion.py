"""A cross-checked version serves its boxes fused with its fold models': agreement raises a box, a lone one sinks."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import TOKEN, recorded
from tests.test_exif import CONFIG, NAMES


def test_boxes_the_models_agree_on_become_one_surer_box():
    from model.fusion import fuse
    from model.policy import FUSE_MIN_SCORE

    a = np.array([[10, 10, 50, 50, 0.8, 0], [100, 100, 140, 140, 0.6, 0], [10, 10, 50, 50, 0.3, 1]])
    b = np.array([[14, 10, 54, 50, 0.4, 0], [200, 200, 220, 220, FUSE_MIN_SCORE / 2, 0]])
    fused = fuse([a, b])
    assert len(fused) == 3  # the agreed cell, the lone one, and the other label's box on the same spot
    x1, y1, x2, y2, score, label = fused[0]
    assert (label, score) == (0, pytest.approx((0.8 + 0.4) / 2))
    assert x1 == pytest.approx((10 * 0.8 + 14 * 0.4) / 1.2) and x2 == pytest.approx((50 * 0.8 + 54 * 0.4) / 1.2)
    assert fused[1][4] == pytest.approx(0.6 / 2)  # one of two models saw it: half its score
    assert fused[2][5] == 1 and fused[2][4] == pytest.approx(0.3 / 2)  # labels never fuse with each other
    assert not (fused[:, 0] == 200).any()  # below the lowest threshold a member's box is no evidence
    assert fuse([np.zeros((0, 6)), np.zeros((0, 6))]).shape == (0, 6)


def test_a_version_fused_with_copies_of_itself_serves_its_own_boxes(make_client, media, assets, person_weights,
                                                                   tmp_path):
    """Members that agree box for box change neither a box nor its score; pruning the version removes them."""
    from model.registry import MEMBERS

    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    registry = client.app.state.backend.registry("1")
    body = recorded("predict")
    body["label_config"] = CONFIG
    bus = media.add("upload", "bus.jpg", assets / "bus.jpg")
    body["tasks"] = [{**body["tasks"][0], "id": 1, "data": {"image": bus}}]

    registry.add(person_weights, {"labels": NAMES}, make_current=True)
    alone = client.post("/predict", json=body).json()["results"][0]
    members = tmp_path / MEMBERS
    members.mkdir()
    for index in range(2):
        shutil.copy2(person_weights, members / f"fold{index}.pt")
    fused = registry.add(person_weights, {"labels": NAMES, "fused_models": 2}, make_current=True, companions=[members])
    assert len(fused.members) == 2
    together = client.post("/predict", json=body).json()["results"][0]
    assert together["model_version"] == fused.name and len(together["result"]) == len(alone["result"]) >= 3
    assert together["score"] == pytest.approx(alone["score"], abs=1e-3)
    for a, b in zip(together["result"], alone["result"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        for key in ("x", "y", "width", "height"):
            assert a["value"][key] == pytest.approx(b["value"][key], abs=0.05)
    assert {str(member) for member in fused.members} <= set(client.app.state.backend.models.loaded())

    (registry.crosscheck_dir / fused.name / MEMBERS).mkdir(parents=True)  # folds of a cross-check left unfinished
    (registry.crosscheck_dir / "v1" / MEMBERS).mkdir(parents=True)
    registry.add(person_weights, {"labels": NAMES}, make_current=True)
    registry.prune(1)
    assert fused.members == [] and not (registry.crosscheck_dir / fused.name).exists()
    assert not (registry.crosscheck_dir / "v1").exists()
