"""What each route accepts, checked before anything is stored or queued, so bad input is a 400 that says why.

Label Studio sends many fields we never read; every model keeps unknown fields (extra="allow"), so a newer Label
Studio adding fields is still understood. Only the fields we use are typed, and typed strictly: a string where a
number belongs is refused rather than guessed at.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool,
                      Tag, model_validator)
from pydantic_core import PydanticCustomError

MAX_JSON_DEPTH = 64  # Label Studio's payloads nest about 6 deep; json.loads itself fails near 1000
PROJECT_ID = re.compile(r"([0-9]{1,12})(?:\.[0-9]{1,20})?")  # '<id>' or Label Studio's '<id>.<created unix ts>'
ACTION = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
TOKEN = re.compile(r"[\x21-\x7e]{0,4096}")  # sent back to Label Studio in an HTTP header: visible ASCII only


class BadBody(ValueError):
    """The body is not JSON we accept (malformed, NaN, or nested too deeply); answered with a 400."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON of bounded depth; json.loads alone accepts NaN and raises RecursionError on deep nesting."""
    too_deep = BadBody(f"the body is not valid JSON: it nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN, integers of more than 4300 digits
        raise BadBody(f"the body is not valid JSON: {exc}") from None
    stack = [(value, 1)]  # walked without recursion, so depth cannot crash the walk either
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    raise too_deep
                stack.append((child, depth + 1))
    return value


# -- scalars --------------------------------------------------------------------------------------------
def project_id(value: object) -> str:
    """Digits only (ASCII: str.isdigit() also accepts '١٢'), canonical (no leading zeros), of a sane length."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**12:
        return str(value)
    found = PROJECT_ID.fullmatch(value) if isinstance(value, str) else None
    if found and int(found.group(1)) > 0:
        return str(int(found.group(1)))
    raise PydanticCustomError("project_id", "a Label Studio project id is a positive number of at most 12 ASCII "
                                            "digits, optionally followed by '.<timestamp>'")


def _http_url(value: str) -> str:
    """Empty, or an http(s) URL with a host: the Label Studio address that images and the API are read from."""
    if not value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok or len(value) > 2048 or any(c.isspace() or ord(c) < 32 for c in value):
        raise PydanticCustomError("http_url", "must be an http(s) URL such as http://localhost:8080")
    return value


def _pattern(regex: re.Pattern, message: str):
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise PydanticCustomError("pattern", message)
        return value
    return AfterValidator(check)


ProjectId = Annotated[str, BeforeValidator(project_id)]
ItemId = Annotated[int, Field(strict=True, ge=1, lt=2**63)]  # task and annotation ids: positive integers
Text = Annotated[str, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Percent = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100, le=200)]  # within an image or so
Extent = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=200)]
Pixels = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1_000_000)]
HttpUrl = Annotated[str, Field(strict=True), AfterValidator(_http_url)]
Token = Annotated[str, Field(strict=True), _pattern(TOKEN, "must be at most 4096 visible ASCII characters")]
Action = Annotated[str, Field(strict=True), _pattern(ACTION, "must be a Label Studio event name such as "
                                                             "ANNOTATION_CREATED")]


class Loose(BaseModel):
    """Unknown fields are kept as sent: Label Studio sends far more than we read."""

    model_config = ConfigDict(extra="allow")

    def as_sent(self) -> dict:
        return self.model_dump(exclude_unset=True)


# -- tasks and annotations ------------------------------------------------------------------------------
class Task(Loose):
    id: ItemId | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class RectangleValue(Loose):
    x: Percent
    y: Percent
    width: Extent
    height: Extent
    rotation: Number = 0.0
    rectanglelabels: list[Text]


class RectangleRegion(Loose):
    """A box: percent coordinates of an image of original_width x original_height pixels."""

    type: Text
    from_name: Text
    to_name: Text
    value: RectangleValue
    original_width: Pixels | None = None
    original_height: Pixels | None = None
    score: Number | None = None


class OtherRegion(Loose):
    """Any other result item (choices, relations, text, ...): kept, never read beyond these types."""

    type: Text | None = None
    from_name: Text | None = None
    to_name: Text | None = None
    value: dict[str, Any] | None = None


def _region_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "rectangle" if isinstance(kind, str) and kind.lower() == "rectanglelabels" else "other region"


Region = Annotated[Union[Annotated[RectangleRegion, Tag("rectangle")], Annotated[OtherRegion, Tag("other region")]],
                   Discriminator(_region_kind)]


class Annotation(Loose):
    id: ItemId | None = None
    task: ItemId | None = None
    result: list[Region] | None = None
    was_cancelled: StrictBool | None = None
    created_at: Text | None = None
    updated_at: Text | None = None


class AnnotationRef(Loose):
    id: ItemId


# -- requests -------------------------------------------------------------------------------------------
class SetupRequest(Loose):
    project: ProjectId
    schema_: Text | None = Field(None, alias="schema")
    label_config: Text | None = None
    hostname: HttpUrl | None = None
    access_token: Token | None = None
    extra_params: dict[str, Any] | None = None

    @property
    def config(self) -> str:
        return self.schema_ or self.label_config or ""


class PredictRequest(Loose):
    project: ProjectId
    tasks: list[Task]
    label_config: Text | None = None
    params: dict[str, Any] | None = None


class ProjectRef(Loose):
    """Webhooks name the project by a 50-key dict; older callers by its id alone."""

    id: ProjectId
    label_config: Text | None = None
    title: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_id(cls, value: Any) -> Any:
        return value if isinstance(value, (dict, BaseModel)) else {"id": value}


class TrainRequest(Loose):
    """What older Label Studio versions POST to /train."""

    project: ProjectRef


class Event(Loose):
    """A webhook event whose payload we do not read beyond the project (PROJECT_UPDATED, START_TRAINING, ...)."""

    action: Action
    project: ProjectRef


class AnnotationEvent(Event):
    action: Literal["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    annotation: Annotation
    task: Task

    @model_validator(mode="after")
    def _names_a_task(self) -> "AnnotationEvent":
        if self.task.id is None and self.annotation.task is None:
            raise PydanticCustomError("task_id", "the event names no task: neither task.id nor annotation.task")
        return self


class AnnotationsDeleted(Event):
    action: Literal["ANNOTATIONS_DELETED"]
    annotations: list[AnnotationRef]


class TasksCreated(Event):
    action: Literal["TASKS_CREATED"]
    tasks: list[Task]


EVENT_MODELS = {"ANNOTATION_CREATED": "annotation event", "ANNOTATION_UPDATED": "annotation event",
                "ANNOTATIONS_DELETED": "deletion event", "TASKS_CREATED": "tasks event"}


def _event_kind(value: Any) -> str:
    action = value.get("action") if isinstance(value, dict) else getattr(value, "action", None)
    return EVENT_MODELS.get(action, "event") if isinstance(action, str) else "event"


WebhookRequest = Annotated[Union[Annotated[AnnotationEvent, Tag("annotation event")],
                                 Annotated[AnnotationsDeleted, Tag("deletion event")],
                                 Annotated[TasksCreated, Tag("tasks event")],
                                 Annotated[Event, Tag("event")]], Discriminator(_event_kind)]
UNION_TAGS = {"rectangle", "other region", "annotation event", "deletion event", "tasks event", "event"}


def describe_errors(errors: list[dict], limit: int = 5) -> str:
    """Pydantic's errors as one readable line: where (body.tasks.0.data) and what, never the input itself."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in UNION_TAGS) or "body"
        message = error.get("msg", "invalid")
        if where == "body" and isinstance(error.get("input"), (bytes, str)):
            message = "the body must be a JSON object sent with Content-Type: application/json"
        parts.append(f"{where}: {message}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "invalid request: " + "; ".join(parts) + more
