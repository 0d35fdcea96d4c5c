"""Photos stored sideways with an EXIF orientation, as phones store them, are upright for prediction, training
and evaluation alike: same size, same pixels, same boxes as the same picture stored upright."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from model.images import probe, read_image
from tests.conftest import TOKEN, recorded

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Normal"/><Label value="Fall"/></RectangleLabels></View>')
NAMES = ["Normal", "Fall"]
# How a camera stores an upright picture for each EXIF orientation: the inverse of what a viewer applies.
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def phone_photo(upright: Path, orientation: int, folder: Path) -> tuple[Path, Path]:
    """The picture as a phone stores it (turned pixels, EXIF orientation set, JPEG), and a lossless upright copy
    of exactly what a viewer shows of that file (Pillow's own exif_transpose, not the code under test)."""
    stored = folder / f"{upright.stem}-o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(upright) as image:
        image.transpose(STORED[orientation]).save(stored, quality=95, exif=exif)
    reference = folder / f"{upright.stem}-o{orientation}-upright.png"
    with Image.open(stored) as image:
        ImageOps.exif_transpose(image).save(reference)
    return stored, reference


@pytest.fixture
def photos(tmp_path, assets) -> dict[int, tuple[Path, Path]]:
    return {o: phone_photo(assets / "bus.jpg", o, tmp_path) for o in STORED}


def test_the_decoder_sizes_and_turns_phone_photos_as_a_viewer_does(photos, assets):
    for orientation, (stored, reference) in photos.items():
        with Image.open(stored) as raw:
            assert raw.size == ((1080, 810) if orientation in (6, 8) else (810, 1080))  # what Pillow's header says
        info = probe(stored)
        assert (info.width, info.height, info.orientation, info.rotated) == (810, 1080, orientation, True)
        pixels = read_image(stored)
        assert pixels.shape == (1080, 810, 3)
        assert np.array_equal(pixels, read_image(reference)), orientation
    plain = probe(assets / "bus.jpg")
    assert (plain.width, plain.height, plain.rotated) == (810, 1080, False)


def test_predicted_regions_on_rotated_files_match_the_upright_file(make_client, media, photos, person_weights):
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    client.app.state.backend.registry("1").add(person_weights, {"labels": NAMES}, make_current=True)
    body = recorded("predict")
    files = [path for pair in photos.values() for path in pair]
    body["label_config"] = CONFIG
    body["tasks"] = [{**body["tasks"][0], "id": i + 1, "data": {"image": media.add("upload", path.name, path)}}
                     for i, path in enumerate(files)]
    results = client.post("/predict", json=body).json()["results"]
    for orientation, (rotated, upright) in zip(photos, zip(results[0::2], results[1::2])):
        assert len(upright["result"]) >= 3, "the upright bus shows at least three people"
        assert len(rotated["result"]) == len(upright["result"]), orientation
        assert rotated["score"] == pytest.approx(upright["score"], abs=1e-3)
        for a, b in zip(rotated["result"], upright["result"]):
            assert (a["original_width"], a["original_height"]) == (b["original_width"], b["original_height"]) == (810, 1080)
            assert a["value"]["rectanglelabels"] == b["value"]["rectanglelabels"]
            for key in ("x", "y", "width", "height"):
                assert a["value"][key] == pytest.approx(b["value"][key], abs=0.1), (orientation, key)


def region(x: float, y: float, w: float, h: float, label: str = "Normal") -> dict:
    """A box as Label Studio stores it: percent of the upright image it showed the annotator."""
    return {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 810,
            "original_height": 1080, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def test_training_and_evaluation_read_rotated_photos_upright_with_matching_labels(tmp_path, photos, person_weights,
                                                                                 yolo_config_dir):
    """The dataset a run trains and is judged on gets upright pixels where Ultralytics reads them, and labels that
    fit them; judging the rotated files gives the scores of the upright ones."""
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils.patches import imread

    from model.dataset import build_dataset, is_held_out
    from model.label_config import parse_label_config
    from model.thresholds import held_out_predictions
    from model.validator import evaluate

    control = parse_label_config(CONFIG)
    # people on the bus, drawn on the upright picture (percent)
    result = [region(5.7, 35.5, 20.9, 48.4), region(26.0, 36.2, 16.9, 44.6), region(81.2, 23.6, 18.7, 58.6)]
    held = [i for i in range(1, 200) if is_held_out(i)][:2]
    kept = [i for i in range(1, 200) if not is_held_out(i)][:2]
    task_ids = dict(zip([*held, *kept], [3, 6, 8, 3]))  # task id -> orientation; two held out, two trained on

    def dataset(which: int) -> tuple[Path, object]:
        records = [{"task_id": t, "data": {"image": str(photos[o][which])}, "result": result} for t, o in task_ids.items()]
        out = tmp_path / ("rotated" if which == 0 else "upright")
        info = build_dataset(records, control, lambda r: Path(r["data"]["image"]), out / "dataset")
        assert not info.skipped and sorted(info.val) == sorted(held)
        assert info.image_sizes == [(810, 1080)] * 4
        return out, info

    (rotated_dir, _), (upright_dir, _) = dataset(0), dataset(1)
    expected_rows = (rotated_dir / "dataset" / "labels" / "val" / f"{held[0]}.txt").read_text()
    for task_id, orientation in task_ids.items():
        split = "val" if task_id in held else "train"
        [written] = (rotated_dir / "dataset" / "images" / split).glob(f"{task_id}.*")
        assert not written.is_symlink() and written.suffix == ".png"  # an upright copy, not the sideways file
        assert np.array_equal(imread(str(written)), read_image(photos[orientation][0]))  # Ultralytics' own reader
        assert (rotated_dir / "dataset" / "labels" / split / f"{task_id}.txt").read_text() == expected_rows
    loaded = YOLODataset(img_path=str(rotated_dir / "dataset" / "images" / "train"), imgsz=320, augment=False,
                         data={"names": dict(enumerate(NAMES)), "channels": 3}, task="detect")
    for i, label in enumerate(loaded.labels):
        assert label["shape"] == (1080, 810)
        assert loaded.load_image(i)[1] == (1080, 810)
        expected = np.array([[float(v) for v in row.split()[1:]] for row in expected_rows.splitlines()])
        assert np.allclose(label["bboxes"], expected, atol=1e-5)
    scores = [evaluate(person_weights, d / "dataset" / "data.yaml", 320, d, images=2) for d in (rotated_dir, upright_dir)]
    assert scores[0] == scores[1] and scores[0].map50 > 0.5
    # the threshold search sees the same boxes, and ground truth laid on the same upright image
    searched = [held_out_predictions(person_weights, d / "dataset" / "data.yaml", 320) for d in (rotated_dir, upright_dir)]
    assert searched[0] == searched[1] and all(len(image.truth) == 3 and image.predicted for image in searched[0])
