"""Who may trigger work: basic auth on every route, refusing to serve a network unauthenticated, webhook credentials."""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys

import pytest

from ls_backend.__main__ import exposure_problem
from ls_backend.settings import Settings
from ls_backend.webhook_auth import points_at
from tests.conftest import REPO, recorded

USER, PASSWORD = "zoë", "pässwörd-ключ"  # non-ASCII, and the password is not even Latin-1


def basic(raw: bytes) -> dict[str, bytes]:
    return {"Authorization": b"Basic " + base64.b64encode(raw)}


@pytest.fixture
def client(make_client):
    return make_client(basic_auth_user=USER, basic_auth_pass=PASSWORD)


def test_non_ascii_credentials_work_in_utf8(client):
    response = client.post("/setup", json=recorded("setup"), headers=basic(f"{USER}:{PASSWORD}".encode()))
    assert response.status_code == 200, response.text


def test_latin1_credentials_as_python_requests_sends_them(make_client):
    """Label Studio calls us through requests' HTTPBasicAuth, which encodes the pair as Latin-1."""
    import requests.auth

    client = make_client(basic_auth_user="zoë", basic_auth_pass="pässwörd")
    header = requests.auth._basic_auth_str("zoë", "pässwörd")
    assert client.get("/health", headers={"Authorization": header}).status_code == 200
    assert client.get("/health", headers=basic("zoe:passwörd".encode("latin-1"))).status_code == 401


@pytest.mark.parametrize("raw", [f"{USER}:wrong".encode(), f"zoe:{PASSWORD}".encode(), USER.encode(),
                                 f"{USER}:{PASSWORD}x".encode(), f"{USER}:{PASSWORD}".encode("utf-16"), b":", b""])
def test_a_wrong_pair_is_401(client, raw):
    response = client.get("/health", headers=basic(raw))
    assert response.status_code == 401
    assert "BASIC_AUTH_USER" in response.json()["error"]
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


@pytest.mark.parametrize("header", [b"", b"Basic", b"Basic ", b"Bearer abc", b"Basic !!!!", b"Basic emV",
                                    b"Basic \xc3\xa9\xc3\xa9", b"Basic " + b"A" * 10_000, b"basic",
                                    "Basic ключ".encode(), b"Digest username=x"])
def test_a_malformed_header_is_401(client, header):
    response = client.post("/webhook", json=recorded("webhook_PROJECT_UPDATED"), headers={"Authorization": header})
    assert response.status_code == 401


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect", "/nonexistent"])
def test_docs_and_openapi_follow_the_same_auth(client, path):
    assert client.get(path).status_code == 401
    allowed = client.get(path, headers=basic(f"{USER}:{PASSWORD}".encode()))
    assert allowed.status_code == (404 if path == "/nonexistent" else 200)
    if path == "/openapi.json":
        assert {"/setup", "/predict", "/webhook"} <= set(allowed.json()["paths"])


def test_without_credentials_configured_nothing_is_asked(make_client):
    client = make_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/health", headers={"Authorization": "Basic !!!"}).status_code == 200


# -- refusing to serve a network without auth -------------------------------------------------------------
@pytest.mark.parametrize("host, auth, opt_out, refused", [
    ("127.0.0.1", ("", ""), False, False),
    ("localhost", ("", ""), False, False),
    ("::1", ("", ""), False, False),
    ("127.0.0.2", ("", ""), False, False),
    ("0.0.0.0", ("", ""), False, True),
    ("::", ("", ""), False, True),
    ("192.168.1.20", ("", ""), False, True),
    ("backend.example", ("", ""), False, True),
    ("0.0.0.0", ("user", ""), False, True),  # half a pair is no protection
    ("0.0.0.0", ("", "pass"), False, True),
    ("0.0.0.0", ("user", "pass"), False, False),
    ("0.0.0.0", ("", ""), True, False),
])
def test_exposure_rule(host, auth, opt_out, refused):
    settings = Settings(_env_file=None, host=host, basic_auth_user=auth[0], basic_auth_pass=auth[1],
                        allow_unauthenticated=opt_out)
    assert (exposure_problem(settings) is not None) == refused


def test_server_refuses_to_start_on_a_network_address_without_auth(tmp_path):
    """It exits before binding anything, and says how to fix it."""
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    env.update(HOST="0.0.0.0", PORT="9", MODEL_DIR=str(tmp_path / "models"))
    done = subprocess.run([sys.executable, "-m", "ls_backend"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    for hint in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "ALLOW_UNAUTHENTICATED=true", "HOST=0.0.0.0"):
        assert hint in done.stderr


# -- the webhook's credentials ----------------------------------------------------------------------------
def test_which_webhook_is_ours():
    assert points_at("http://backend:9090/webhook", "backend:9090")
    assert points_at("http://Backend:9090/webhook/", "backend:9090")
    assert points_at("https://proxy.example/ml/webhook", "proxy.example")
    assert not points_at("http://backend:9091/webhook", "backend:9090")  # another backend: never our credentials
    assert not points_at("http://backend:9090/hooks", "backend:9090")
    assert not points_at("http://evil.example/backend:9090/webhook", "backend:9090")
    assert not points_at("http://[::1/webhook", "backend:9090")
    assert not points_at(None, "backend:9090")


def test_setup_never_waits_for_the_webhook_patch(make_client):
    """Label Studio gives /setup 3 s; the patch runs in the background even when Label Studio does not answer."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections into the backlog and never answers them
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        client = make_client(basic_auth_user=USER, basic_auth_pass=PASSWORD, label_studio_url=url,
                             label_studio_api_key="0123456789abcdef0123456789abcdef01234567")
        response = client.post("/setup", json=recorded("setup"), headers=basic(f"{USER}:{PASSWORD}".encode()))
        assert response.status_code == 200
        # /setup answered while the patcher still waits on Label Studio: a second one is not started.
        assert not client.app.state.webhook_auth.ensure("1", "testserver")
    finally:
        silent.close()


def test_no_patching_without_an_api_key_or_without_auth(make_client):
    assert make_client(basic_auth_user=USER, basic_auth_pass=PASSWORD).app.state.webhook_auth is None
    assert make_client(basic_auth_user="", basic_auth_pass="", label_studio_url="http://127.0.0.1:1",
                       label_studio_api_key="k").app.state.webhook_auth is None
