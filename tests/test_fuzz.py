"""Hypothesis sends every route over a thousand generated bodies and path parameters: none may answer 5xx.

Most cases are Label Studio's own recorded payloads with a few values replaced, removed or joined by unknown
fields, so they get past the first checks and reach the deeper ones. Task images point at a local stand-in for
Label Studio that has no files, so /predict never runs the model: every case is a request, not an inference.
"""
from __future__ import annotations

import copy
import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TOKEN, recorded

WEBHOOKS = ["webhook_ANNOTATION_CREATED", "webhook_ANNOTATION_UPDATED", "webhook_ANNOTATIONS_DELETED",
            "webhook_PROJECT_UPDATED", "webhook_START_TRAINING", "webhook_TASKS_CREATED"]
USER, PASSWORD = "fuzz", "pässwort"

leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
          | st.text(max_size=12) | st.sampled_from(["", "0", "1", "1.5", "١٢", "1" * 300, "rectanglelabels",
                                                   "ANNOTATION_CREATED", "/data/upload/1/x.png", "<View/>"]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


def places(doc, prefix: tuple = ()):
    """Every position in a JSON document, as the keys and indices that lead to it."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from places(value, prefix + (key,))


@st.composite
def mutated(draw, base: dict):
    """The payload with one to three places replaced by any JSON, removed, or given an unknown field."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(places(doc))))
        how = draw(st.sampled_from(["replace", "remove", "add"]))
        if not path:
            doc = draw(json_values) if how == "replace" else doc
            continue
        *parents, last = path
        parent = doc
        for key in parents:
            parent = parent[key]
        if how == "replace":
            parent[last] = draw(json_values)
        elif how == "remove":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent[last] = [parent[last], draw(json_values)]
    return doc


def fuzz(cases: int):
    return settings(max_examples=cases, database=None, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def test_no_body_or_path_parameter_gets_a_5xx(make_client, media):
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, min_annotations=10**9)
    sent: list[tuple[str, int]] = []

    def check(method: str, path: str, **kwargs) -> None:
        response = client.request(method, path, **kwargs)
        sent.append((path, response.status_code))
        assert response.status_code < 500, (method, path, kwargs, response.text[:500])

    predict = recorded("predict")
    predict["label_config"] = predict["label_config"].replace('"cat"', '"person" predicted_values="Normal"')

    @fuzz(150)
    @given(mutated(recorded("setup")))
    def setup(body):
        check("POST", "/setup", json=body)

    @fuzz(200)
    @given(mutated(predict))
    def predict_route(body):
        check("POST", "/predict", json=body)

    @fuzz(350)
    @given(st.sampled_from(WEBHOOKS).flatmap(lambda name: mutated(recorded(name))))
    def webhook(body):
        check("POST", "/webhook", json=body)

    @fuzz(60)
    @given(mutated({"project": 1, "label_config": predict["label_config"], "annotations": []}))
    def train(body):
        check("POST", "/train", json=body)

    @fuzz(100)
    @given(st.sampled_from(["/setup", "/predict", "/webhook", "/train"]), json_values)
    def any_json(route, body):
        check("POST", route, json=body)

    @fuzz(80)
    @given(st.sampled_from(["/setup", "/predict", "/webhook", "/train"]), st.binary(max_size=64))
    def any_bytes(route, raw):
        check("POST", route, content=raw, headers={"Content-Type": "application/json"})

    @fuzz(150)
    @given(st.sampled_from(["GET /status/{}", "GET /projects/{}/", "GET /projects/{}/plot.png",
                            "POST /autolabel/{}", "GET /versions?project={}"]),
           st.text(min_size=1, max_size=20) | st.from_regex(r"[0-9]{1,14}(\.[0-9]{0,3})?", fullmatch=True))
    def path_params(route, project):
        method, path = route.split(" ")
        check(method, path.format(quote(project, safe="")))

    for run in (setup, predict_route, webhook, train, any_json, any_bytes, path_params):
        run()

    auth_client = make_client(basic_auth_user=USER, basic_auth_pass=PASSWORD)

    @fuzz(100)
    @given(st.binary(max_size=40) | st.binary(max_size=30).map(lambda raw: b"Basic " + raw))
    def authorization(header):
        response = auth_client.get("/health", headers={"Authorization": header})
        sent.append(("/health", response.status_code))
        assert response.status_code == 401, (header, response.text)

    authorization()
    assert client.app.state.queue.idle(timeout=120)  # START_TRAINING cases queued jobs; none may be left running
    assert len(sent) >= 1000, len(sent)
    statuses = {status for _, status in sent}
    assert statuses >= {200, 400, 401}, statuses  # the cases reached both sides of the validation
    print(json.dumps({"cases": len(sent), "statuses": sorted(statuses)}))
