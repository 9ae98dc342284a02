"""The served OpenAPI description states what the API refuses: a client that checks
its bodies against `HookInput` or `Event` finds the unknown keys and out-of-range
values the engine refuses with 422 before it sends them, not at run time."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from engine.events import Event
from engine.hooks import Hook, parse_hook

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
          "maxLength", "minItems", "maxItems", "pattern")


def openapi() -> dict[str, Any]:
    return json.loads(resources.files("engine").joinpath("openapi.json").read_text("utf-8"))


def schema_of(name: str) -> dict[str, Any]:
    """A component schema, with the document's components to resolve its references."""
    doc = openapi()
    return {**doc["components"]["schemas"][name], "components": doc["components"]}


def resolved(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A model's schema with its $ref and "X or null" taken apart."""
    if "$ref" in schema:
        return resolved(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    options = [s for s in schema.get("anyOf", ()) if s.get("type") != "null"]
    return resolved(options[0], defs) if len(options) == 1 else schema


def pairs(model: dict[str, Any], api: dict[str, Any], defs: dict[str, Any],
          path: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, model schema, API schema) of every value the two describe alike."""
    model = resolved(model, defs)
    yield path, model, api
    if model.get("type") == "object" and "properties" in model:
        for key in model["properties"].keys() & api.get("properties", {}).keys():
            yield from pairs(model["properties"][key], api["properties"][key], defs,
                             f"{path}.{key}")
    elif model.get("type") == "array" and "items" in model and "items" in api:
        yield from pairs(model["items"], api["items"], defs, f"{path}[]")


@pytest.mark.parametrize("name, model, least", [
    ("HookInput", Hook.model_json_schema(mode="validation"), 20),  # batch sizes, ports...
    ("Event", msgspec.json.schema(Event), 8),  # ids
])
def test_the_description_states_every_key_and_bound_the_engine_checks(
        name: str, model: dict[str, Any], least: int) -> None:
    api = openapi()["components"]["schemas"][name]
    defs = model.get("$defs", {})
    compared = 0
    for path, mine, theirs in pairs(model, api, defs, name):
        if mine.get("type") == "object" and "properties" in mine:
            # a settings object (not a map of names to values): its keys and no other
            assert theirs.get("additionalProperties") is False, path
            assert set(theirs["properties"]) == set(mine["properties"]), path
        for bound in BOUNDS:
            if bound in mine:
                assert theirs.get(bound) == mine[bound], (path, bound)
                compared += 1
    assert compared >= least


def example_hooks() -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parents[2] / "deploy" / "hooks.example.json"
    return json.loads(path.read_text("utf-8"))


@pytest.mark.parametrize("where, value, reason", [
    ("", {"sendcontent": True}, "Additional properties"),
    ("target.http_batch", {"maxBatchSize": 10}, "Additional properties"),
    ("target.http_batch", {"max_batch_size": 0}, "less than or equal to the minimum"),
    ("target.http_batch", {"max_batch_size": 10001}, "greater than the maximum"),
    ("target.http_batch", {"flush_timeout_sec": 0}, "less than or equal to the minimum"),
    ("filters", {"campaign": [1]}, "Additional properties"),
    # rules the engine states in validators (pydantic's schema does not show them)
    ("", {"database": 2**63}, "greater than the maximum"),
    ("target.http_batch", {"request_timeout_sec": 0.001}, "less than the minimum"),
])
def test_a_hook_the_engine_refuses_is_refused_by_the_description_too(
        where: str, value: dict[str, Any], reason: str) -> None:
    schema = schema_of("HookInput")
    hook = next(h for h in example_hooks() if "http_batch" in h["target"])
    jsonschema.validate(hook, schema)  # as the engine accepts it
    parse_hook(hook)
    bad = copy.deepcopy(hook)
    part = bad
    for key in filter(None, where.split(".")):
        part = part.setdefault(key, {})
    part.update(value)
    with pytest.raises(jsonschema.ValidationError, match=reason):
        jsonschema.validate(bad, schema)
    with pytest.raises(Exception, match="invalid hook"):
        parse_hook(bad)


def test_every_example_hook_and_event_fits_the_description() -> None:
    for hook in example_hooks():
        jsonschema.validate(hook, schema_of("HookInput"))
        jsonschema.validate({**hook, "id": 7}, schema_of("HookInput"))  # as read back
    event = {"event_type": "click", "event_date": "2026-11-30T05:00:00Z", "account_id": 1,
             "subscription": [{"channel": "email", "email": "a@example.org"}]}
    msgspec.convert(event, Event)
    jsonschema.validate(event, schema_of("Event"))
    event["subscription"][0]["is_active"] = True  # refused by the engine: unknown key
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(event, Event)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        jsonschema.validate(event, schema_of("Event"))


@pytest.mark.parametrize("field", ["user", "password", "vhost"])
def test_an_empty_rabbitmq_login_is_refused_by_the_description_too(field: str) -> None:
    hook = {"name": "q", "account_id": 1, "target": {"rabbitmq_queue": {
        "host": "rabbit.internal", "queue": "q", field: ""}}}
    with pytest.raises(Exception, match="invalid hook"):
        parse_hook(hook)
    with pytest.raises(jsonschema.ValidationError, match="should be non-empty"):
        jsonschema.validate(hook, schema_of("HookInput"))
