"""The request bodies of the API as pydantic models, so that the OpenAPI document describes each one.

Each field is checked by a ``before`` validator that raises :class:`BodyFieldError` with the one-line
reason the API has always answered (``id must be a device id: ...``); the API's validation handler
answers such an error with that reason alone, an unknown field with ``unknown field(s): ...`` and a
missing one with ``<field> is required`` (:func:`body_error_reason`). The annotations carry the same
limits for the schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from edge_core.messages import DEVICE_ID_RE, LABEL_KEY_RE, MAX_LABEL_VALUE, MAX_LABELS, PROFILE_RE

__all__ = ["MAX_REASON", "ActionBody", "EnrollBody", "StartRolloutBody", "body_error_reason"]

MAX_REASON = 1000
_FIELD_ERROR = "edge_fleet_field"
_REASON_TEXT = f"reason must be text of at most {MAX_REASON} characters"


def BodyFieldError(reason: str) -> PydanticCustomError:  # noqa: N802 - reads as an exception class
    """The error a body validator raises: answered 400 with ``reason`` as it is."""
    return PydanticCustomError(_FIELD_ERROR, reason)


def _reason(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_REASON:
        raise BodyFieldError(_REASON_TEXT)
    return " ".join(value.split())


def _whole(value: object, reason: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BodyFieldError(reason)
    return value


Reason = Annotated[str, BeforeValidator(_reason),
                   Field(max_length=MAX_REASON, description="why, for the audit log (whitespace folded)")]


class EnrollBody(BaseModel):
    """``POST /api/v1/devices``: enrol a device before it reports."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=DEVICE_ID_RE.pattern, description="the device id, as in its agent.yaml")]
    labels: Annotated[dict[Annotated[str, Field(pattern=LABEL_KEY_RE.pattern)],
                           Annotated[str, Field(max_length=MAX_LABEL_VALUE)]] | None,
                      Field(max_length=MAX_LABELS,
                            description="labels until the device reports its own")] = None
    profile: Annotated[str | None, Field(pattern=PROFILE_RE.pattern, description="the device profile")] = None
    reason: Reason = ""

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: object) -> object:
        if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
            raise BodyFieldError("id must be a device id: 1-64 characters of A-Z a-z 0-9 . _ -")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, Mapping) or len(value) > MAX_LABELS:
            raise BodyFieldError(f"labels must be a mapping of at most {MAX_LABELS} name: value pairs")
        for key, item in value.items():
            if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
                raise BodyFieldError(f"labels: invalid label name {str(key)[:60]!r}")
            if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE:
                raise BodyFieldError(f"labels.{key}: value must be text of at most {MAX_LABEL_VALUE} "
                                     "characters")
        return dict(value)

    @field_validator("profile", mode="before")
    @classmethod
    def _profile(cls, value: object) -> object:
        if value is not None and (not isinstance(value, str) or not PROFILE_RE.match(value)):
            raise BodyFieldError("profile must be a profile name: 1-64 characters of A-Z a-z 0-9 . _ -")
        return value


class StartRolloutBody(BaseModel):
    """``POST /api/v1/rollouts``: start a rollout of a recorded signed release."""

    model_config = ConfigDict(extra="forbid")

    release: Annotated[int, Field(ge=0, description="the signed release version")]
    plan: Annotated[dict[str, Any] | None,
                    Field(description="an inline rollout plan (docs/rollouts.md)")] = None
    plan_name: Annotated[str | None, Field(description="a plan the server knows: rollouts/NAME.yaml")] = None
    reason: Reason = ""
    preflight: Annotated[bool, Field(description="every targeted device plans the release first; the "
                                                 "first wave starts only when the preflight passes")] = False

    @field_validator("release", mode="before")
    @classmethod
    def _release(cls, value: object) -> object:
        return _whole(value, "release must be a release version (a whole number)")

    @field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, value: object) -> object:
        if value is not None and not isinstance(value, Mapping):
            raise BodyFieldError("plan must be a mapping (the plan document)")
        return value

    @field_validator("plan_name", mode="before")
    @classmethod
    def _plan_name(cls, value: object) -> object:
        if value is not None and not isinstance(value, str):
            raise BodyFieldError("plan_name must be text")
        return value


class ActionBody(BaseModel):
    """``POST /api/v1/rollouts/{id}/{action}``: why, and for ``promote`` the wave approved."""

    model_config = ConfigDict(extra="ignore")

    reason: Reason = ""
    wave: Annotated[int | None, Field(ge=0, description="promote: the wave index (0-based) approved")] = None

    @field_validator("wave", mode="before")
    @classmethod
    def _wave(cls, value: object) -> object:
        return None if value is None else _whole(value, "wave must be a wave index")


def body_error_reason(errors: Sequence[Any]) -> str | None:
    """The one-line reason of a request body's validation errors, or None when none is about a body.

    A validator's own reason is answered as it is; unknown fields are listed; a missing field is
    ``<field> is required``; a body that is not a JSON object says so.
    """
    body = [e for e in errors if isinstance(e, Mapping) and tuple(e.get("loc", ()))[:1] == ("body",)]
    if not body:
        return None
    unknown = sorted(str(e["loc"][-1]) for e in body if e.get("type") == "extra_forbidden")
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    first = body[0]
    loc = tuple(first.get("loc", ()))[1:]
    where = ".".join(str(p) for p in loc)
    if first.get("type") == _FIELD_ERROR:
        return str(first.get("msg"))
    if first.get("type") == "missing" and where:
        return f"{where} is required"
    if not where or first.get("type") in ("model_attributes_type", "dict_type", "json_invalid"):
        return "the request body must be a JSON object"
    return f"invalid {where}: {first.get('msg', 'invalid value')}"
