"""The ML-backend protocol against the recorded Label Studio requests, real weights and real images."""
from __future__ import annotations

import base64
import time

import pytest

from tests.conftest import PERSON_CONFIG, TOKEN, MediaServer, recorded


def predict_body(tasks: list[dict], config: str = PERSON_CONFIG) -> dict:
    body = recorded("predict")
    body["label_config"] = config
    body["tasks"] = [{**body["tasks"][0], "id": i + 1, "data": data} for i, data in enumerate(tasks)]
    return body


def test_health_answers_fast_without_loading_a_model(make_client):
    client = make_client()
    started = time.perf_counter()
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "UP"
    assert time.perf_counter() - started < 1.0
    assert client.get("/").status_code == 200


def test_setup_with_recorded_payload_returns_a_model_version(make_client):
    client = make_client()
    response = client.post("/setup", json=recorded("setup"))
    assert response.status_code == 200
    assert response.json() == {"model_version": "base-person-fall-yolov8s"}


@pytest.mark.parametrize("schema, missing", [
    ('<View><Image name="image" value="$image"/><Text name="t" value="$t"/><Choices name="c" toName="t">'
     '<Choice value="a"/></Choices></View>', "RectangleLabels"),  # choices about a text: nothing of ours to learn
    ('<View><Text name="t" value="$text"/><RectangleLabels name="l" toName="t"><Label value="a"/></RectangleLabels></View>',
     "Image"),
    ('<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image"></RectangleLabels></View>',
     "Label"),
    ("<View><Image", "XML"),
])
def test_setup_refuses_a_config_it_cannot_serve_and_says_why(make_client, schema, missing):
    client = make_client()
    response = client.post("/setup", json={**recorded("setup"), "schema": schema})
    assert response.status_code == 400
    assert missing in response.json()["error"]


def test_malformed_bodies_get_4xx_with_a_message(make_client):
    client = make_client()
    for route in ("/setup", "/predict", "/webhook"):
        response = client.post(route, content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400, route
        assert "JSON" in response.json()["error"]
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 400
    assert client.post("/predict", json={"project": "1.1", "tasks": "x", "label_config": PERSON_CONFIG}).status_code == 400


def test_predict_uploads_local_files_and_urls_finds_people(make_client, media, assets, tmp_path):
    other = MediaServer(tmp_path / "other-host")
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, allowed_media_hosts="127.0.0.1")
    tasks = [{"image": media.add("upload", "b03ea613-bus.jpg", assets / "bus.jpg")},
             {"image": media.add("local", "zidane.jpg", assets / "zidane.jpg")},
             {"image": other.add("public", "bus2.jpg", assets / "bus.jpg")}]
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    for item, (width, height), people in zip(results, [(810, 1080), (1280, 720), (810, 1080)], [3, 2, 3]):
        assert item["model_version"] == "base-person-fall-yolov8s"
        assert 0 < item["score"] <= 1
        persons = [r for r in item["result"] if r["value"]["rectanglelabels"] == ["person"]]
        assert len(persons) >= people
        for region in persons:
            assert region["from_name"] == "label" and region["to_name"] == "image"
            assert (region["original_width"], region["original_height"]) == (width, height)
            value = region["value"]
            assert 0 <= value["x"] < 100 and 0 <= value["y"] < 100
            assert 0 < value["width"] <= 100 - value["x"] + 1e-6 and 0 < value["height"] <= 100 - value["y"] + 1e-6
            assert 0.25 <= region["score"] <= 1
    # Only Label Studio's own host got the token; the allowed third-party URL did not.
    assert all(auth == f"Token {TOKEN}" for path, auth in media.handler.seen if path.startswith("/data/"))
    assert other.handler.seen == [("/bus2.jpg", None)]
    other.close()


def test_predict_falls_back_to_hostname_and_token_from_setup(make_client, media, assets):
    client = make_client()
    assert client.post("/setup", json={**recorded("setup"), "schema": PERSON_CONFIG, "hostname": media.url,
                                        "access_token": TOKEN}).status_code == 200
    body = predict_body([{"image": media.add("upload", "bus.jpg", assets / "bus.jpg")}])
    results = client.post("/predict", json=body).json()["results"]
    assert len(results[0]["result"]) >= 3


def test_personal_access_token_is_exchanged_for_an_access_token(make_client, media, assets):
    media.handler.refresh_token = "eyJhbGciOi.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"
    client = make_client(label_studio_url=media.url, label_studio_api_key=media.handler.refresh_token)
    body = predict_body([{"image": media.add("upload", "bus.jpg", assets / "bus.jpg")}])
    results = client.post("/predict", json=body).json()["results"]
    assert len(results[0]["result"]) >= 3
    assert ("/data/upload/1/bus.jpg", "Bearer access-from-refresh") in media.handler.seen


def test_labels_the_base_model_does_not_know_get_empty_results(make_client, media, assets):
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    body = recorded("predict")  # cat / dog: not person-detector classes
    body["tasks"][0]["data"]["image"] = media.add("upload", "b03ea613-img1.png", assets / "bus.jpg")
    body["tasks"][1]["data"]["image"] = media.add("local", "img2.png", assets / "zidane.jpg")
    results = client.post("/predict", json=body).json()["results"]
    assert [r["result"] for r in results] == [[], []]


def test_broken_missing_refused_and_unauthorized_images_only_empty_their_own_task(make_client, media, assets, tmp_path):
    other = MediaServer(tmp_path / "other-host")
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    good = media.add("upload", "bus.jpg", assets / "bus.jpg")
    tasks = [
        {"image": good},
        {"image": media.add("upload", "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")},
        {"image": "/data/upload/1/missing.jpg"},
        {"image": "file:///etc/passwd"},
        {"image": "http://169.254.169.254/latest/meta-data/"},
        {"image": other.add("public", "other-host.jpg", assets / "bus.jpg")},  # not allowed: no ALLOWED_MEDIA_HOSTS
        {"other": "no image key"},
        {"image": good},
    ]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert len(results) == len(tasks)
    assert [bool(r["result"]) for r in results] == [True, False, False, False, False, False, False, True]
    assert other.handler.seen == []
    other.close()


def test_label_studio_media_without_token_is_refused_with_401(make_client, media, assets):
    client = make_client(label_studio_url=media.url)
    body = predict_body([{"image": media.add("upload", "bus.jpg", assets / "bus.jpg")}])
    results = client.post("/predict", json=body).json()["results"]
    assert results[0]["result"] == []
    assert ("/data/upload/1/bus.jpg", None) in media.handler.seen


def test_basic_auth_protects_every_route(make_client):
    client = make_client(basic_auth_user="ls", basic_auth_pass="s3cret")
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    for method, route in [("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("post", "/webhook"),
                          ("get", "/versions"), ("get", "/metrics")]:
        assert getattr(client, method)(route).status_code == 401, route
        assert getattr(client, method)(route, headers=bad).status_code == 401, route
    assert client.get("/health", headers=good).status_code == 200
    assert client.post("/setup", json=recorded("setup"), headers=good).status_code == 200


def test_versions_and_metrics_answer_before_any_training(make_client):
    client = make_client()
    client.post("/setup", json=recorded("setup"))
    assert client.get("/versions").json()["versions"] == []
    text = client.get("/metrics").text
    assert "lsyolo_request_seconds" in text and 'lsyolo_versions{project="1"} 0.0' in text


def test_missing_base_weights_are_reported_not_crashed(make_client, media, assets):
    client = make_client(base_model="yolo11n.pt", label_studio_url=media.url, label_studio_api_key=TOKEN)
    body = predict_body([{"image": media.add("upload", "bus.jpg", assets / "bus.jpg")}])
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert "ALLOW_DOWNLOADS" in response.json()["error"]
    assert "yolo11n.pt" in client.get("/health").json()["base_model_error"]
