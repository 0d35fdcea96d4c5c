"""Secrets and SSRF: where the backend connects, and which host gets Label Studio's token, against real local servers."""
from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
import requests

from ls_backend.ls_client import LabelStudioClient, LabelStudioError, http_session
from ls_backend.media import MediaError, MediaFetcher
from ls_backend.netpolicy import AddressPolicy, AddressRefused, parse_origin
from tests.conftest import PERSON_CONFIG, TOKEN
from tests.scripted_server import ScriptedServer, redirect, send

IMAGE = b"\x89PNG\r\n\x1a\n not decoded here"


class FakeDNS:
    """An injectable resolver: names map to address lists (or a function of the call count); others fail to resolve."""

    def __init__(self, names: dict):
        self.names = names
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        found = self.names[host]
        return found(len(self.calls)) if callable(found) else found


@pytest.fixture
def servers():
    started: list[ScriptedServer] = []

    def start(routes=None, host: str = "127.0.0.1", port: int = 0, tls=None) -> ScriptedServer:
        started.append(ScriptedServer(routes, host, port, tls))
        return started[-1]

    yield start
    for server in started:
        server.close()


def make_fetcher(tmp_path, allowed: list[str], client: LabelStudioClient | None = None, resolver=None) -> MediaFetcher:
    return MediaFetcher(tmp_path / "cache", allowed, client, max_bytes=1 << 20, timeout=5.0, resolver=resolver)


def cached_files(tmp_path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# -- the corpus: every form is refused before any connection ------------------------------------------------
LISTED = ["allowed.test", "169.254.1.1", "[fe80::1]", "169.254.169.254", "metadata.google.internal", "metadata",
          "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[fd00:ec2::254]",
          "100.100.100.200", "[::a9fe:a9fe]", "224.0.0.1", "0.0.0.0", "240.0.0.1"]

CORPUS = {
    "backslash": "http://127.0.0.1:{port}\\@allowed.test/x.jpg",
    "userinfo": "http://allowed.test@127.0.0.1:{port}/x.jpg",
    "userinfo-fragment": "http://127.0.0.1:{port}#@allowed.test/x.jpg",
    "crlf": "http://allowed.test/x.jpg\r\nHost: 127.0.0.1:{port}",
    "tab-in-host": "http://allowed.test\t/x.jpg",
    "space": "http://allowed.test /x.jpg",
    "nul": "http://allowed.test\x00.127.0.0.1/x.jpg",
    "del": "http://allowed.test/\x7fx.jpg",
    "ipv4-mapped": "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "ipv4-mapped-hex": "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "ipv4-compatible": "http://[::169.254.169.254]/latest/meta-data/",
    "nat64": "http://[64:ff9b::169.254.169.254]/latest/meta-data/",
    "nat64-hex": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "6to4": "http://[2002:a9fe:a9fe::]/latest/meta-data/",
    "decimal": "http://2852039166/latest/meta-data/",
    "octal": "http://0251.0376.0251.0376/latest/meta-data/",
    "hex": "http://0xa9fea9fe/latest/meta-data/",
    "short-loopback": "http://127.1:{port}/x.jpg",
    "link-local-v4": "http://169.254.1.1/x.jpg",
    "link-local-v6": "http://[fe80::1]/x.jpg",
    "link-local-v6-zone": "http://[fe80::1%25lo]/x.jpg",
    "metadata-ip": "http://169.254.169.254/latest/meta-data/",
    "metadata-name": "http://metadata.google.internal/computeMetadata/v1/",
    "metadata-name-fqdn": "http://metadata.google.internal./computeMetadata/v1/",
    "metadata-short-name": "http://metadata/computeMetadata/v1/",
    "metadata-aws-v6": "http://[fd00:ec2::254]/latest/meta-data/",
    "metadata-alibaba": "http://100.100.100.200/latest/meta-data/",
    "multicast": "http://224.0.0.1/x.jpg",
    "unspecified": "http://0.0.0.0:{port}/x.jpg",
    "reserved": "http://240.0.0.1/x.jpg",
    "not-listed-loopback": "http://127.0.0.1:{port}/x.jpg",
    "file-scheme": "file:///etc/passwd",
}


@pytest.mark.parametrize("form", sorted(CORPUS))
def test_ssrf_corpus_is_refused_without_a_connection(tmp_path, servers, form):
    target = servers({"/x.jpg": send(200, IMAGE), "/latest/meta-data/": send(200, b"secret")})
    dns = FakeDNS({"allowed.test": ["127.0.0.1"]})
    fetcher = make_fetcher(tmp_path, LISTED, resolver=dns)
    with pytest.raises(MediaError, match="refused"):
        fetcher.fetch(CORPUS[form].format(port=target.port))
    assert target.seen == []
    assert dns.calls == []
    assert cached_files(tmp_path) == []


@pytest.mark.parametrize("names, listed", [
    ({"link.test": ["169.254.7.7"]}, "link.test"),
    ({"link.test": ["fe80::7"]}, "link.test"),
    ({"link.test": ["::ffff:169.254.169.254"]}, "link.test"),
    ({"link.test": ["64:ff9b::a9fe:a9fe"]}, "link.test"),
    ({"link.test": ["fd00:ec2::254"]}, "link.test"),
    ({"link.test": ["127.0.0.1", "169.254.169.254"]}, "link.test"),  # one bad address spoils the name
])
def test_names_resolving_to_link_local_or_metadata_are_refused_even_when_listed(tmp_path, servers, names, listed):
    target = servers({"/x.jpg": send(200, IMAGE)})
    fetcher = make_fetcher(tmp_path, [listed], resolver=FakeDNS(names))
    with pytest.raises(MediaError, match="refused link.test"):
        fetcher.fetch(f"http://link.test:{target.port}/x.jpg")
    assert target.seen == []


@pytest.mark.parametrize("names", [
    {"gone.test": ["::"]},  # not a failure, but the unspecified address
    {},  # NXDOMAIN
    {"gone.test": []},  # no address at all
])
def test_a_name_that_does_not_resolve_to_a_usable_address_is_refused(tmp_path, names):
    fetcher = make_fetcher(tmp_path, ["gone.test"], resolver=FakeDNS(names))
    with pytest.raises(MediaError, match="refused gone.test"):
        fetcher.fetch("http://gone.test/x.jpg")
    assert cached_files(tmp_path) == []


def test_dns_failure_fails_closed_with_the_system_resolver(tmp_path):
    fetcher = make_fetcher(tmp_path, ["no-such-host.invalid"])
    with pytest.raises(MediaError, match="refused no-such-host.invalid: cannot resolve"):
        fetcher.fetch("http://no-such-host.invalid/x.jpg")


def test_a_listed_name_on_a_loopback_address_is_fetched(tmp_path, servers):
    target = servers({"/x.jpg": send(200, IMAGE)})
    fetcher = make_fetcher(tmp_path, ["images.test"], resolver=FakeDNS({"images.test": ["127.0.0.1"]}))
    assert fetcher.fetch(f"http://images.test:{target.port}/x.jpg").read_bytes() == IMAGE


def test_rebinding_the_connection_goes_to_the_address_that_was_checked(tmp_path, servers):
    checked = servers({"/x.jpg": send(200, b"checked"), "/y.jpg": send(200, b"checked")})
    later = servers({"/x.jpg": send(200, b"rebound"), "/y.jpg": send(200, b"rebound")}, host="127.0.0.2", port=checked.port)
    # The first lookup answers 127.0.0.1; every later one 127.0.0.2. The system resolver does not know the name,
    # so a second lookup by the HTTP client itself would fail rather than silently go elsewhere.
    dns = FakeDNS({"rebind.test": lambda calls: ["127.0.0.1"] if calls == 1 else ["127.0.0.2"]})
    fetcher = make_fetcher(tmp_path, ["rebind.test"], resolver=dns)
    assert fetcher.fetch(f"http://rebind.test:{checked.port}/x.jpg").read_bytes() == b"checked"
    assert dns.calls == ["rebind.test"]
    assert checked.paths() == ["/x.jpg"] and later.seen == []
    # The next request is checked again and goes where that check pointed, not to the pooled connection.
    assert fetcher.fetch(f"http://rebind.test:{checked.port}/y.jpg").read_bytes() == b"rebound"
    assert checked.paths() == ["/x.jpg"] and later.paths() == ["/y.jpg"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_goes_to_the_pinned_address_with_sni_host_and_certificate_check_on_the_name(tmp_path, servers):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pinned.test",
                    "-addext", "subjectAltName=DNS:pinned.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = servers({"/x.jpg": send(200, IMAGE)}, tls=(str(cert), str(key)))
    dns = FakeDNS({"pinned.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    session = http_session(AddressPolicy(["pinned.test", "other.test"], dns))
    assert session.get(f"https://pinned.test:{server.port}/x.jpg", verify=str(cert), timeout=10).content == IMAGE
    assert server.hosts == [f"pinned.test:{server.port}"]
    # Same address, another name: the certificate is checked against the name, not the address connected to.
    with pytest.raises(requests.exceptions.SSLError, match="pinned.test|match"):
        session.get(f"https://other.test:{server.port}/x.jpg", verify=str(cert), timeout=10)


def test_policy_refuses_loopback_and_private_names_for_untrusted_hosts():
    dns = FakeDNS({"loop.test": ["127.0.0.1"], "lan.test": ["10.1.2.3"], "mapped.test": ["::ffff:127.0.0.1"],
                   "cgnat.test": ["100.64.0.1"], "public.test": ["93.184.216.34"]})
    policy = AddressPolicy(["lan.test:8080"], dns)
    for url in ("http://loop.test/", "http://lan.test/", "http://mapped.test/", "http://cgnat.test/"):
        with pytest.raises(AddressRefused, match="loopback or private"):
            policy.addresses(parse_origin(url))
    assert policy.addresses(parse_origin("http://lan.test:8080/")) == ("10.1.2.3",)
    assert policy.addresses(parse_origin("http://public.test/")) == ("93.184.216.34",)


# -- redirects -------------------------------------------------------------------------------------------------
def test_media_redirects_are_not_followed(tmp_path, servers):
    other = servers({"/x.jpg": send(200, IMAGE)})
    ls = servers({"/data/upload/1/a.jpg": redirect("http://169.254.169.254/latest/meta-data/"),
                  "/data/upload/1/b.jpg": redirect(f"{other.url}/x.jpg")})
    fetcher = make_fetcher(tmp_path, ["127.0.0.1"], LabelStudioClient(ls.url, TOKEN))
    for ref in ("/data/upload/1/a.jpg", "/data/upload/1/b.jpg"):
        with pytest.raises(MediaError, match="answered 302 .redirects are not followed"):
            fetcher.fetch(ref)
    assert other.seen == []
    assert cached_files(tmp_path) == []


def test_api_redirect_hops_are_checked_like_the_first_request(servers):
    inside = servers({"/api/projects/1": send(200, b"{}")})
    ls = servers({"/api/projects/1": redirect("http://169.254.169.254/latest/meta-data/"),
                  "/api/projects/3": redirect(f"http://internal.test:{inside.port}/api/projects/1"),
                  "/api/projects/4": redirect(f"http://[::ffff:127.0.0.1]:{inside.port}/api/projects/1"),
                  "/api/projects/5": redirect("/api/projects/6"),
                  "/api/projects/6": send(200, b'{"id": 6}')})
    client = LabelStudioClient(ls.url, TOKEN, resolver=FakeDNS({"internal.test": ["127.0.0.1"]}))
    for project in (1, 3, 4):
        with pytest.raises(LabelStudioError, match="refused"):
            client.project(project)
    assert inside.seen == []
    assert client.project(5) == {"id": 6}  # a hop on Label Studio's own host is fine, with the token
    assert ls.seen[-1] == ("/api/projects/6", f"Token {TOKEN}")


def test_api_redirect_to_localhost_is_refused_with_the_system_resolver(servers):
    inside = servers({"/api/projects/1": send(200, b"{}")})
    ls = servers({"/api/projects/2": redirect(f"http://localhost:{inside.port}/api/projects/1")})
    with pytest.raises(LabelStudioError, match="refused localhost"):
        LabelStudioClient(ls.url, TOKEN).project(2)
    assert inside.seen == []


def test_label_studio_itself_may_be_on_loopback_by_name(servers):
    ls = servers({"/api/projects/1": send(200, b'{"id": 1}')})
    assert LabelStudioClient(f"http://localhost:{ls.port}", TOKEN).project(1) == {"id": 1}
    assert ls.seen == [("/api/projects/1", f"Token {TOKEN}")]


def test_label_studio_on_a_refused_address_is_not_called(servers):
    client = LabelStudioClient("http://[::ffff:169.254.169.254]", TOKEN)
    with pytest.raises(LabelStudioError, match="cloud metadata"):
        client.project(1)
    with pytest.raises(LabelStudioError, match="unusable Label Studio URL"):
        LabelStudioClient("http://127.0.0.1\\@ls.test", TOKEN)


# -- the token goes only to the host it came with ----------------------------------------------------------
def test_token_goes_only_to_label_studio_origin(tmp_path, servers):
    ls = servers({"/data/upload/1/a.jpg": send(200, IMAGE), "/x.jpg": send(200, IMAGE)})
    other = servers({"/x.jpg": send(200, IMAGE)})
    fetcher = make_fetcher(tmp_path, ["127.0.0.1", "localhost"], LabelStudioClient(ls.url, TOKEN))
    fetcher.fetch("/data/upload/1/a.jpg")
    fetcher.fetch(f"{other.url}/x.jpg")  # another port of the same address
    fetcher.fetch(f"http://localhost:{ls.port}/x.jpg")  # the same server under another name
    assert ls.seen == [("/data/upload/1/a.jpg", f"Token {TOKEN}"), ("/x.jpg", None)]
    assert other.seen == [("/x.jpg", None)]


@pytest.fixture
def label_studio_and_evil(servers):
    routes = {"/data/upload/1/a.jpg": send(200, IMAGE), "/api/projects/1": send(200, b'{"id": 1}')}
    return servers(routes), servers(dict(routes))


def test_setup_naming_a_new_hostname_without_token_does_not_inherit_the_token(make_client, label_studio_and_evil):
    ls, evil = label_studio_and_evil
    app = make_client()
    setup = {"project": "1.1", "schema": PERSON_CONFIG}
    assert app.post("/setup", json={**setup, "hostname": ls.url, "access_token": TOKEN}).status_code == 200
    assert app.post("/setup", json={**setup, "hostname": evil.url}).status_code == 200
    backend = app.app.state.backend
    backend.fetcher("1").fetch("/data/upload/1/a.jpg")  # /predict's image download
    backend.client("1").project(1)  # the training resync's first call
    assert evil.seen == [("/data/upload/1/a.jpg", None), ("/api/projects/1", None)]
    assert ls.seen == []


def test_label_studio_url_wins_over_setup_hostnames(make_client, label_studio_and_evil):
    ls, evil = label_studio_and_evil
    app = make_client(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    body = {"project": "1.1", "schema": PERSON_CONFIG, "hostname": evil.url, "access_token": "f" * 40}
    assert app.post("/setup", json=body).status_code == 200
    backend = app.app.state.backend
    backend.fetcher("1").fetch("/data/upload/1/a.jpg")
    backend.client("1").project(1)
    assert ls.seen == [("/data/upload/1/a.jpg", f"Token {TOKEN}"), ("/api/projects/1", f"Token {TOKEN}")]
    assert evil.seen == []


def test_label_studio_url_without_key_ignores_the_setup_token(make_client, label_studio_and_evil):
    ls, _ = label_studio_and_evil
    app = make_client(label_studio_url=ls.url)
    body = {"project": "1.1", "schema": PERSON_CONFIG, "hostname": ls.url, "access_token": "f" * 40}
    assert app.post("/setup", json=body).status_code == 200
    with pytest.raises(MediaError, match="answered 404"):
        app.app.state.backend.fetcher("1").fetch("/data/upload/1/missing.jpg")
    assert ls.seen == [("/data/upload/1/missing.jpg", None)]


@pytest.mark.parametrize("settings, message", [
    ({"label_studio_api_key": TOKEN}, "LABEL_STUDIO_API_KEY is sent only to LABEL_STUDIO_URL"),
    ({"label_studio_url": "http://127.0.0.1\\@ls.test:8080"}, "refused URL containing"),
    ({"label_studio_url": "http://admin@ls.test:8080"}, "user info"),
    ({"allowed_media_hosts": "images.test, http://cdn.test/"}, "not a host or host:port"),
    ({"allowed_media_hosts": "0xa9fea9fe"}, "numeric IPv4 spelling"),
])
def test_settings_that_would_leak_or_never_work_are_refused_at_startup(backend_env, settings, message):
    from ls_backend.settings import get_settings

    backend_env(**settings)
    with pytest.raises(ValueError, match=message):
        get_settings()
