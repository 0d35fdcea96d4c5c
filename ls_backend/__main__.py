"""`python -m ls_backend`: serve the backend; subcommands manage a project's versions."""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from pydantic_core import PydanticCustomError

from .schemas import project_id
from .settings import Settings, get_settings


def limit_malloc_arenas() -> None:
    """glibc gives every thread that allocates its own arena; with many request threads that multiplies memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = 2
    except (OSError, AttributeError):  # not glibc: nothing to limit
        pass


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(settings: Settings) -> str | None:
    """Why listening on HOST would let anyone who reaches it trigger training and labeling; None if it would not."""
    if settings.allow_unauthenticated or is_loopback(settings.host):
        return None
    if settings.basic_auth_user and settings.basic_auth_pass:
        return None
    return (f"refusing to listen on HOST={settings.host} without basic auth: anyone who can reach it could store "
            f"annotations, start training and push predictions. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and give "
            f"the same pair in Label Studio's model connection, 'Use authentication'), or set "
            f"ALLOW_UNAUTHENTICATED=true on a network you trust.")


def serve() -> int:
    import uvicorn

    limit_malloc_arenas()
    settings = get_settings()
    problem = exposure_problem(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    uvicorn.run("ls_backend.app:create_app", factory=True, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False, timeout_keep_alive=30)
    return 0


def project_arg(value: str) -> str:
    """The same project ids as the routes take, so the CLI cannot name a folder outside MODEL_DIR."""
    try:
        return project_id(value)
    except PydanticCustomError as exc:
        raise argparse.ArgumentTypeError(exc.message()) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ls_backend", description="YOLO backend for Label Studio")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP server (the default)")
    versions = sub.add_parser("versions", help="list a project's model versions")
    versions.add_argument("--project", required=True, type=project_arg)
    versions.add_argument("--control", help="a control's name (polygons, choices, ...); default: the box model")
    rollback = sub.add_parser("rollback", help="serve an earlier version of a project's model")
    rollback.add_argument("--project", required=True, type=project_arg)
    rollback.add_argument("--version", help="e.g. v3; default: the version before the current one")
    rollback.add_argument("--control", help="a control's name (polygons, choices, ...); default: the box model")
    train = sub.add_parser("train", help="train a project now, in this process, from its stored annotations")
    train.add_argument("--project", required=True, type=project_arg)
    autolabel = sub.add_parser("autolabel", help="predict every unlabeled task with the served version and store it in Label Studio")
    autolabel.add_argument("--project", required=True, type=project_arg)
    args = parser.parse_args(argv)
    if args.command in (None, "serve"):
        return serve()
    from model.registry import ProjectRegistry

    registry = ProjectRegistry(get_settings().model_dir, args.project)
    if getattr(args, "control", None):
        from .controls import control_registry

        registry = control_registry(get_settings().model_dir, args.project, args.control)
    if args.command == "versions":
        current = registry.current_name()
        for v in registry.versions():
            print(f"{'*' if v.name == current else ' '} {v.name:6} {v.meta.get('status', ''):10} "
                  f"mAP50={v.meta.get('metrics', {}).get('map50', 0):.3f} annotations={v.meta.get('annotations')}")
        return 0
    if args.command == "rollback":
        try:
            version = registry.rollback(args.version)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"project {args.project} now serves {version.name}")
        return 0
    from .jobs import autolabel_project, train_project

    result = train_project(args.project) if args.command == "train" else autolabel_project(args.project, progress_bar=True)
    print(json.dumps(result, indent=1, default=str))
    return 0 if result.get("state") in ("finished", "superseded") else 1


if __name__ == "__main__":
    raise SystemExit(main())
