"""Fixtures for end-to-end tests: one real Label Studio per session, and our backend started per test."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .label_studio import SHARED_DIR, Backend, HarnessError, LabelStudio, ensure_venv


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so teardown can show the servers' logs after a failure."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


def _failed(request) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


def _print_log(name: str, path: Path) -> None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    print(f"\n===== {name} log {path} (last 6000 chars) =====\n{text[-6000:]}", file=sys.stderr)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudio:
    """A real Label Studio on 127.0.0.1, from a cached migrated DB, stopped with all its children at the end."""
    try:
        exe = ensure_venv()
        ls = LabelStudio(exe, tmp_path_factory.mktemp("label-studio"))
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        ls.start()
    except HarnessError as exc:
        ls.stop()
        pytest.fail(str(exc), pytrace=False)
    yield ls
    ls.stop()


@pytest.fixture
def start_backend(label_studio, tmp_path, request):
    """start_backend(**env_overrides) -> a running `python -m ls_backend` talking to the session's Label Studio."""
    weights = SHARED_DIR / "weights" / "person-fall-yolov8s.pt"
    if not weights.is_file():
        pytest.skip(f"E2E SKIPPED: the shared weights {weights} are absent (set SHARED_DIR to the folder that "
                    f"holds weights/person-fall-yolov8s.pt)")
    started: list[Backend] = []

    def start(**overrides) -> Backend:
        backend = Backend(tmp_path / f"backend{len(started)}", label_studio, overrides)
        backend.workdir.mkdir(parents=True, exist_ok=True)
        started.append(backend)
        try:
            return backend.start()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)

    yield start
    for backend in started:
        backend.stop()
    if _failed(request):
        for backend in started:
            if backend.process is not None:
                _print_log("backend", backend.process.log)
        if label_studio.process is not None:
            _print_log("label-studio", label_studio.process.log)


@pytest.fixture
def backend(start_backend) -> Backend:
    """Our backend with its default settings (no auth, in-process queue)."""
    return start_backend()
