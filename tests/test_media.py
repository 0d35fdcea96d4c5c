"""Media downloads: a wall-clock limit, nothing partial left behind, and a cache bounded by least-recent use."""
from __future__ import annotations

import os
import time

import pytest

from ls_backend.media import MediaError, MediaFetcher
from tests.scripted_server import ScriptedServer, drip_body, drip_headers, drop_after, send


@pytest.fixture
def server():
    started = ScriptedServer()
    yield started
    started.close()


def make_fetcher(tmp_path, **kwargs) -> MediaFetcher:
    options = {"max_bytes": 1 << 20, "timeout": 5.0, **kwargs}
    return MediaFetcher(tmp_path / "cache", ["127.0.0.1"], None, **options)


def cache_contents(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


@pytest.mark.timeout(60)  # without a wall clock, the download would outlast this, as the drip goes on for hours
@pytest.mark.parametrize("drip", [drip_body(total=10_000, interval=0.5), drip_headers(count=10_000, interval=0.5)],
                         ids=["body", "headers"])
def test_a_slow_drip_is_stopped_by_the_wall_clock_and_leaves_no_file(tmp_path, server, drip):
    server.routes["/slow.jpg"] = drip
    fetcher = make_fetcher(tmp_path, timeout=1.5)
    with pytest.raises(MediaError, match="longer than MEDIA_TIMEOUT=1.5s"):
        fetcher.fetch(f"{server.url}/slow.jpg")
    assert cache_contents(tmp_path) == []


def test_a_connection_dropped_mid_body_leaves_no_file(tmp_path, server):
    server.routes["/cut.jpg"] = drop_after(announced=10_000, sent=b"x" * 100)
    with pytest.raises(MediaError, match="cannot download"):
        make_fetcher(tmp_path).fetch(f"{server.url}/cut.jpg")
    assert cache_contents(tmp_path) == []


def test_a_body_over_the_size_limit_leaves_no_file(tmp_path, server):
    server.routes["/big.jpg"] = send(200, b"x" * 5000)
    with pytest.raises(MediaError, match="larger than MEDIA_MAX_BYTES=1000"):
        make_fetcher(tmp_path, max_bytes=1000).fetch(f"{server.url}/big.jpg")
    assert cache_contents(tmp_path) == []


def test_the_cache_evicts_the_least_recently_used_files(tmp_path, server):
    for name in "abc":
        server.routes[f"/{name}.jpg"] = send(200, name.encode() * 1000)
    fetcher = make_fetcher(tmp_path, cache_max_bytes=2500)
    a = fetcher.fetch(f"{server.url}/a.jpg")
    b = fetcher.fetch(f"{server.url}/b.jpg")
    assert fetcher.fetch(f"{server.url}/a.jpg") == a  # a hit: a is now more recent than b
    c = fetcher.fetch(f"{server.url}/c.jpg")  # 3000 bytes > 2500: the least recently used (b) goes
    assert a.is_file() and c.is_file() and not b.exists()
    assert server.paths() == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert fetcher.fetch(f"{server.url}/b.jpg").read_bytes() == b"b" * 1000  # downloaded again
    assert not a.exists() and c.is_file()
    assert server.paths()[-1] == "/b.jpg"


def test_a_file_larger_than_the_cache_is_still_returned(tmp_path, server):
    server.routes["/a.jpg"] = send(200, b"a" * 3000)
    path = make_fetcher(tmp_path, cache_max_bytes=1000).fetch(f"{server.url}/a.jpg")
    assert path.read_bytes() == b"a" * 3000


def test_partial_files_of_a_killed_process_are_cleaned_up(tmp_path, server):
    server.routes["/a.jpg"] = send(200, b"a" * 10)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".part-stale", cache / ".part-fresh"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    make_fetcher(tmp_path).fetch(f"{server.url}/a.jpg")
    assert not stale.exists() and fresh.exists()
