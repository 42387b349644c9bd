"""The language-model backend protocol shared by the PROTEUS planners, and the JSON handling that
keeps a model's reply *data*: parsed, validated against a schema, never executed.

A backend has ``name`` and ``chat(messages, *, schema=None, max_tokens=512, temperature=0.0,
seed=None) -> str``; backends that can rank a closed set of options (the local model) also have
``score_choices(prompt, choices) -> list[float]``. :func:`ask_json` is what planners call: it asks
for a reply under a schema, parses it (tolerating code fences and text around the object),
validates it, retries once with the validation errors, and raises :class:`LLMError` when the reply
still does not validate, so the caller can fall back to the rule planner.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol, runtime_checkable


class LLMError(RuntimeError):
    """A backend could not produce a usable reply (transport error, error status, bad JSON)."""


@runtime_checkable
class LLMBackend(Protocol):
    """What a planner needs from a language model."""

    name: str

    def chat(self, messages: list[dict], *, schema: dict | None = None, max_tokens: int = 512,
             temperature: float = 0.0, seed: int | None = None) -> str:
        """The assistant's reply text to ``messages`` (``[{"role", "content"}]``); with ``schema``
        (a JSON schema) the reply should be one JSON value that validates against it."""
        ...


def check_messages(messages) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str}``; ``ValueError`` otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]['role'] must be system, user or assistant, got {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_json_reply(text: str) -> Any:
    """The first JSON object (or array) in a model's reply.

    Accepts a bare JSON value, one wrapped in a Markdown code fence, or one with prose around it.
    Raises :class:`LLMError` naming the problem when no complete JSON value is found.
    """
    if not isinstance(text, str):
        raise LLMError(f"reply is not text: {type(text).__name__}")
    s = text.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(s):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(s, i)
                return value
            except json.JSONDecodeError:
                continue
    raise LLMError(f"reply holds no complete JSON object: {s[:120]!r}")


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "null": lambda v: v is None,
}


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if not ref:
        return schema
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return _resolve(node, root)


def validate_json(value: Any, schema: dict, *, _root: dict | None = None, _path: str = "$") -> list[str]:
    """Errors of ``value`` against the subset of JSON Schema the PROTEUS schemas use (``type``,
    ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties``, ``items``,
    ``minItems``/``maxItems``, ``uniqueItems``, ``minimum``/``maximum``, ``maxLength``, ``anyOf``/
    ``oneOf``, local ``$ref``/``$defs``). An empty list means valid."""
    root = schema if _root is None else _root
    schema = _resolve(schema, root)
    errs: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES[x](value) for x in types):
            return [f"{_path}: expected {t}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errs.append(f"{_path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and not any(value == e and type(value) is type(e) or
                                    (isinstance(e, (int, float)) and _TYPES["number"](value) and value == e)
                                    for e in schema["enum"]):
        errs.append(f"{_path}: {value!r} is not one of {schema['enum']!r:.200}")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            matches = [not validate_json(value, s, _root=root, _path=_path) for s in schema[key]]
            n = sum(matches)
            if n == 0 or (key == "oneOf" and n > 1):
                errs.append(f"{_path}: matches {n} of the {key} alternatives")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                errs.append(f"{_path}: missing required property {req!r}")
        for k, v in value.items():
            if k in props:
                errs += validate_json(v, props[k], _root=root, _path=f"{_path}.{k}")
            elif schema.get("additionalProperties", True) is False:
                errs.append(f"{_path}: unexpected property {k!r}")
    if isinstance(value, list):
        if "items" in schema:
            for i, v in enumerate(value):
                errs += validate_json(v, schema["items"], _root=root, _path=f"{_path}[{i}]")
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{_path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{_path}: more than {schema['maxItems']} items")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) < len(value):
            errs.append(f"{_path}: items are not unique")
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        errs.append(f"{_path}: longer than {schema['maxLength']} characters")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{_path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{_path}: {value} > maximum {schema['maximum']}")
    return errs


def ask_json(backend, messages: list[dict], schema: dict, *, retries: int = 1, max_tokens: int = 512,
             temperature: float = 0.0, seed: int | None = None, transcript: list | None = None) -> Any:
    """Ask ``backend`` for a JSON reply valid under ``schema``; retry ``retries`` times with the
    validation errors appended to the conversation. Every exchange is appended to ``transcript``
    (``{"messages", "reply", "errors"}``) when given, for the run log. Raises :class:`LLMError`
    when no reply validates."""
    msgs = check_messages(messages)
    last = ""
    for attempt in range(retries + 1):
        try:
            reply = backend.chat(msgs, schema=schema, max_tokens=max_tokens, temperature=temperature, seed=seed)
        except LLMError as e:
            if transcript is not None:
                transcript.append({"messages": msgs, "reply": None, "errors": [str(e)]})
            raise
        try:
            value = parse_json_reply(reply)
            errs = validate_json(value, schema)
        except LLMError as e:
            value, errs = None, [str(e)]
        if transcript is not None:
            transcript.append({"messages": msgs, "reply": reply, "errors": errs})
        if not errs:
            return value
        last = "; ".join(errs[:5])
        msgs = msgs + [{"role": "assistant", "content": str(reply)[:2000]},
                       {"role": "user", "content": "That reply is not valid: " + last +
                        ". Answer again with one JSON object that follows the schema exactly."}]
    raise LLMError(f"no valid JSON reply after {retries + 1} attempt(s): {last}")
