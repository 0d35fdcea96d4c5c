"""Every request body is checked before anything is stored: bad input is a 400 (or 413) that says what is wrong."""
from __future__ import annotations

import copy
import json
import socket
import threading

import pytest

from ls_backend.__main__ import main as cli
from ls_backend.settings import Settings
from tests.conftest import RECORDED, recorded

CONFIG = recorded("setup")["schema"]


def refused(response, *words: str, status: int = 400) -> str:
    """Assert a clear refusal: the status, our error shape, and each word in the message."""
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message
    return message


def annotation(**changes) -> dict:
    body = copy.deepcopy(recorded("webhook_ANNOTATION_CREATED"))
    for path, value in changes.items():
        target = body
        *parents, last = path.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value
    return body


def region(**value_changes) -> dict:
    item = copy.deepcopy(recorded("webhook_ANNOTATION_CREATED")["annotation"]["result"][0])
    item["value"].update(value_changes)
    return item


@pytest.fixture
def client(make_client):
    return make_client()


# -- what Label Studio really sends is accepted ---------------------------------------------------------
ROUTES = {"setup": "/setup", "predict": "/predict"}


@pytest.mark.parametrize("path", sorted(p.stem for p in RECORDED.glob("*.json") if p.stem != "health"))
def test_every_recorded_payload_is_accepted(client, path):
    body = recorded(path)
    if path == "predict":
        body["tasks"] = [{**t, "data": {"image": 7}} for t in body["tasks"]]  # no image to fetch: nothing to predict
    response = client.post(ROUTES.get(path, "/webhook"), json=body)
    assert response.status_code == 200, response.text


def test_unknown_fields_at_every_level_are_kept(client):
    body = annotation()
    body["new_top_level"] = {"a": [1]}
    body["annotation"]["future_field"] = None
    body["task"]["meta"] = {"anything": ["goes", 1.5]}
    body["annotation"]["result"][0]["origin"] = "manual"
    body["annotation"]["result"][0]["value"]["future"] = True
    body["annotation"]["result"].append({"type": "choices", "from_name": "c", "to_name": "image",
                                         "value": {"choices": ["x"]}})
    body["annotation"]["result"].append({"type": "relation", "from_id": "a1", "to_id": "a2", "direction": "right"})
    assert client.post("/webhook", json=body).status_code == 200
    [record] = client.app.state.backend.store("1").records()
    assert record["result"][0]["origin"] == "manual" and record["result"][0]["value"]["future"] is True
    assert [r["type"] for r in record["result"]] == ["rectanglelabels", "choices", "relation"]


def test_events_we_do_not_read_are_accepted(client):
    for action in ("TASKS_DELETED", "PROJECT_UPDATED", "ANNOTATIONS_CREATED", "LABEL_LINK_CREATED"):
        body = {**recorded("webhook_PROJECT_UPDATED"), "action": action, "annotation": [{"id": 1}], "tasks": [{"id": 1}]}
        assert client.post("/webhook", json=body).json()["action"] == action


# -- wrong types ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["schema", "label_config"])
@pytest.mark.parametrize("value", [{"xml": CONFIG}, [CONFIG], 42, True])
def test_a_config_must_be_a_string(client, field, value):
    body = {**recorded("setup"), "schema": None, field: value}
    refused(client.post("/setup", json=body), field)
    refused(client.post("/predict", json={**recorded("predict"), "label_config": value}), "label_config")


@pytest.mark.parametrize("hostname", [42, ["http://x"], {"url": "http://x"}, "ftp://x", "not a url", "http://",
                                      "http://[::1", "http://x:99999", "http://x/\n"])
def test_hostname_must_be_an_http_url(client, hostname):
    refused(client.post("/setup", json={**recorded("setup"), "hostname": hostname}), "hostname")
    assert client.app.state.backend.store("1").info() == {}  # nothing remembered from a refused /setup


@pytest.mark.parametrize("token", [123, "with space", "tab\there", "é" * 3, "x" * 5000])
def test_access_token_must_be_a_header_safe_string(client, token):
    refused(client.post("/setup", json={**recorded("setup"), "access_token": token}), "access_token")


@pytest.mark.parametrize("task_id", ["1", 1.5, True, -1, 0, 2**63, [1]])
def test_task_ids_are_positive_integers(client, task_id):
    body = recorded("predict")
    body["tasks"][0]["id"] = task_id
    refused(client.post("/predict", json=body), "tasks.0.id")
    refused(client.post("/webhook", json=annotation(task__id=task_id)), "task.id")
    assert client.app.state.backend.store("1").records() == []


@pytest.mark.parametrize("data", ["image.jpg", ["/data/upload/1/a.jpg"], 5, None])
def test_task_data_is_an_object(client, data):
    body = recorded("predict")
    body["tasks"][1]["data"] = data
    refused(client.post("/predict", json=body), "tasks.1.data")
    refused(client.post("/webhook", json=annotation(task__data=data)), "task.data")


@pytest.mark.parametrize("tasks", ["x", {"id": 1}, [1, 2], [[{"id": 1}]], None])
def test_tasks_is_a_list_of_objects(client, tasks):
    refused(client.post("/predict", json={**recorded("predict"), "tasks": tasks}), "tasks")


@pytest.mark.parametrize("action", [None, 7, "", "annotation_created", "ANNOTATION CREATED", "A" * 65, ["X"]])
def test_webhook_action_is_an_event_name(client, action):
    refused(client.post("/webhook", json={**recorded("webhook_PROJECT_UPDATED"), "action": action}), "action")


def test_an_annotation_event_needs_its_annotation_and_task(client):
    body = annotation()
    del body["task"]
    refused(client.post("/webhook", json=body), "task: Field required")
    refused(client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}}), "annotation")
    refused(client.post("/webhook", json=annotation(annotation__result={"not": "a list"})), "annotation.result")
    body = annotation(annotation__task=None)
    body["task"].pop("id")
    refused(client.post("/webhook", json=body), "names no task")


@pytest.mark.parametrize("annotations", [[{"id": "2"}], [{"id": None}], [2], [{"id": [2]}], [{}], {"id": 2},
                                         None, "2"])
def test_deleted_annotation_ids_are_integers_and_nothing_is_deleted_otherwise(client, annotations):
    assert client.post("/webhook", json=annotation()).status_code == 200
    body = {**recorded("webhook_ANNOTATIONS_DELETED"), "annotations": annotations}
    refused(client.post("/webhook", json=body), "annotations")
    assert [r["annotation_id"] for r in client.app.state.backend.store("1").records()] == [1]


BAD_REGIONS = {
    "x is a string": region(x="12.5"),
    "x is a bool": region(x=True),
    "width is negative": region(width=-3),
    "far outside the image": region(y=1e300),
    "labels are not a list": region(rectanglelabels="dog"),
    "labels are not strings": region(rectanglelabels=[{"dog": 1}]),
    "rotation is null": region(rotation=None),
    "no value": {k: v for k, v in region().items() if k != "value"},
    "value is a list": {**region(), "value": [1, 2]},
    "no from_name": {k: v for k, v in region().items() if k != "from_name"},
    "type is a number": {**region(), "type": 5},
    "original_width is zero": {**region(), "original_width": 0},
    "original_height is a string": {**region(), "original_height": "48"},
    "a number, not a region": 5,
    "a string, not a region": "rectanglelabels",
}


@pytest.mark.parametrize("name", BAD_REGIONS)
def test_a_malformed_region_refuses_the_annotation_and_stores_nothing(client, name):
    created = client.post("/webhook", json=annotation(annotation__result=[region(), BAD_REGIONS[name]]))
    refused(created, "annotation.result.1")
    store = client.app.state.backend.store("1")
    assert store.records() == []
    # An update carrying a malformed region leaves the stored annotation as it was.
    assert client.post("/webhook", json=annotation()).status_code == 200
    updated = annotation(action="ANNOTATION_UPDATED", annotation__result=[BAD_REGIONS[name]])
    refused(client.post("/webhook", json=updated), "annotation.result.0")
    assert store.records()[0]["result"] == recorded("webhook_ANNOTATION_CREATED")["annotation"]["result"]


def test_nan_and_infinity_are_not_json(client):
    text = json.dumps(annotation()).replace('"x": 12.5', '"x": NaN')
    refused(client.post("/webhook", content=text, headers={"Content-Type": "application/json"}), "NaN")
    text = json.dumps(recorded("predict")).replace('"overlap": 1', '"overlap": -Infinity')
    refused(client.post("/predict", content=text, headers={"Content-Type": "application/json"}), "Infinity")


@pytest.mark.parametrize("route", ["/setup", "/predict", "/webhook", "/train"])
def test_deeply_nested_json_is_refused_not_crashed(client, route):
    deep = "[" * 100_000 + "]" * 100_000
    refused(client.post(route, content=deep, headers={"Content-Type": "application/json"}), "nests deeper")
    body = recorded("predict")
    body["tasks"][0]["data"]["nested"] = json.loads("[" * 70 + "]" * 70)  # within json.loads' reach, not ours
    refused(client.post(route, json=body), "nests deeper")


@pytest.mark.parametrize("route", ["/setup", "/predict", "/webhook", "/train"])
def test_bodies_that_are_not_a_json_object(client, route):
    for content in (b"", b"[]", b"\"text\"", b"null", b"\xff\xfe\x00", b"{" * 3, b"1" * 5000):
        response = client.post(route, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (content[:20], response.text)
        assert response.json()["error"]
    refused(client.post(route, content=json.dumps(recorded("setup")), headers={"Content-Type": "text/plain"}),
            "Content-Type: application/json")


# -- project ids ----------------------------------------------------------------------------------------
BAD_PROJECTS = ["١٢", "１２", "1" * 300, "12" + "٣", "-1", "0", "1e3", " 1", "1.", "1.x", "", "../1", True, 1.5,
                [1], None, 10**12]


@pytest.mark.parametrize("project", BAD_PROJECTS, ids=repr)
def test_project_ids_are_short_ascii_digits(client, project):
    refused(client.post("/setup", json={**recorded("setup"), "project": project}), "project", "ASCII digits")
    refused(client.post("/predict", json={**recorded("predict"), "project": project}), "project")
    body = recorded("webhook_START_TRAINING")
    body["project"]["id"] = project
    refused(client.post("/webhook", json=body), "project.id")
    refused(client.post("/train", json={"project": project}), "project")
    assert client.app.state.backend.projects() == []


@pytest.mark.parametrize("project", ["١٢", "1" * 300, "0", "-1", "x", "%20"], ids=repr)
def test_path_project_ids_are_short_ascii_digits(client, project):
    for method, path in [("get", f"/status/{project}"), ("get", f"/projects/{project}/"),
                         ("get", f"/projects/{project}/plot.png"), ("post", f"/autolabel/{project}"),
                         ("get", f"/versions?project={project}")]:
        refused(getattr(client, method)(path), "project", "ASCII digits")
    assert client.app.state.backend.projects() == []


@pytest.mark.parametrize("project", ["١٢", "1" * 300, "../1"])
def test_the_command_line_takes_the_same_project_ids(project, capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["versions", "--project", project])
    assert exited.value.code == 2 and "ASCII digits" in capsys.readouterr().err


def test_project_ids_in_every_form_label_studio_uses(client):
    assert client.post("/setup", json={**recorded("setup"), "project": "7.1795494870"}).status_code == 200
    assert client.post("/setup", json={**recorded("setup"), "project": "007"}).status_code == 200
    body = recorded("webhook_PROJECT_UPDATED")
    body["project"]["id"] = 8
    assert client.post("/webhook", json=body).json()["project"] == "8"
    assert client.post("/train", json={"project": 9}).json()["project"] == "9"
    assert client.get("/status/7").json()["project"] == "7"
    assert client.app.state.backend.projects() == ["7", "8", "9"]


# -- size limits ----------------------------------------------------------------------------------------
def test_predict_carries_at_most_max_predict_tasks(make_client):
    client = make_client(max_predict_tasks=3)
    body = recorded("predict")
    body["tasks"] = [{**body["tasks"][0], "id": i + 1, "data": {"image": 7}} for i in range(4)]
    refused(client.post("/predict", json=body), "4 tasks", "MAX_PREDICT_TASKS=3", status=413)
    body["tasks"] = body["tasks"][:3]
    assert len(client.post("/predict", json=body).json()["results"]) == 3


def test_label_studio_batches_of_max_predict_tasks_fit_in_max_body_bytes():
    """A full batch as Label Studio sends it (tasks with an annotation and a prediction of 20 boxes each)."""
    defaults = Settings(_env_file=None)
    task = recorded("predict")["tasks"][0]
    regions = [copy.deepcopy(recorded("webhook_ANNOTATION_CREATED")["annotation"]["result"][0]) for _ in range(20)]
    task = {**task, "annotations": [{**recorded("webhook_ANNOTATION_CREATED")["annotation"], "result": regions}],
            "predictions": [{"result": regions, "score": 0.5, "model_version": "v12"}]}
    body = {**recorded("predict"), "tasks": [task] * defaults.max_predict_tasks}
    assert len(json.dumps(body)) < defaults.max_body_bytes


def test_bodies_above_max_body_bytes_get_413(make_client):
    client = make_client(max_body_bytes=2000)
    big = recorded("predict")  # 1.3 kB
    big["tasks"][0]["data"]["padding"] = "x" * 1000
    response = client.post("/predict", json=big)  # refused from its Content-Length, by Starlette's middleware
    assert response.status_code == 413 and response.text == "Content Too Large"

    def chunks():  # no Content-Length: the bytes are counted as they stream in
        yield b'{"project": "1", "tasks": ['
        for _ in range(100):
            yield b'{"id": 1, "data": {}},'
        yield b'{"id": 1}]}'
    refused(client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"}),
            "larger than MAX_BODY_BYTES=2000", status=413)
    assert client.post("/setup", json=recorded("setup")).status_code == 200  # small bodies still pass


@pytest.fixture
def live_server(backend_env):
    """The app under uvicorn on 127.0.0.1, so raw HTTP can show what is and is not read."""
    import uvicorn

    from ls_backend.app import create_app

    backend_env(max_body_bytes=1000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.05)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(30)
    sock.close()


def raw_status(address, head: bytes, body: bytes) -> int:
    """Send a request whose body is never finished and read the answer's status."""
    with socket.create_connection(address, timeout=60) as conn:  # the timeout only stops a hang
        conn.sendall(head + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ")[1])


def test_an_oversized_body_is_refused_without_being_read(live_server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # A terabyte announced, a byte sent: the answer comes without waiting for the rest.
    assert raw_status(live_server, head + b"Content-Length: 1000000000000\r\n\r\n", b"{") == 413
    # Streamed in chunks with no length: refused once 1000 bytes have arrived, though the stream never ends.
    chunk = b"x" * 600
    assert raw_status(live_server, head + b"Transfer-Encoding: chunked\r\n\r\n",
                      (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2) == 413
