"""Reading a task request: the body under a size limit and a deadline, the image and the task's fields.

A request is ``multipart/form-data`` (the image as the file field ``image``, every other field as
text, arrays written as JSON) or a JSON object (the image as base64 in ``image``, optionally a
``data:`` URL, the other fields as JSON values). Every problem raises ``RequestError`` with the
HTTP status to answer; the image itself is decoded later by ``pixelllm.data.images.load_image``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from pixelllm.serve.tasks import ServedTask

MAX_TEXT = 2000  # characters of a text field; far past any expression, short of a costly decode
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before its answer (logged only)


class RequestError(Exception):
    """A request that cannot be served, with its HTTP status (and headers, for a 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


async def read_body(request: Request, max_bytes: int, deadline_s: float) -> bytes:
    """The whole body: 413 past ``max_bytes`` (before reading, when Content-Length says so), 408
    when it has not all arrived within ``deadline_s`` (a client trickling bytes holds only its own
    connection, never a place in the queue)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise RequestError(413, f"the upload is {int(length):,} bytes, over the limit of {max_bytes:,}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"the upload is over the limit of {max_bytes:,} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {deadline_s:g} s") from None
    except ClientDisconnect:
        raise RequestError(CLIENT_GONE, "the client disconnected before its body was read") from None
    return b"".join(chunks)


async def parse_request(request: Request, body: bytes, task: ServedTask) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the task's arguments (absent fields left out) of a request's ``body``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        image, raw = await _form_fields(request, body)
        values = {name: _from_text(task, name, value) for name, value in raw.items()}
    elif content_type == "application/json":
        image, values = _json_fields(body)
    else:
        raise RequestError(415, "the body must be multipart/form-data or application/json "
                                f"(it is {content_type or 'untyped'})")
    return image, _task_arguments(task, values)


async def _form_fields(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    replay = Request(request.scope, _replay(body))
    try:
        form = await replay.form(max_files=1, max_fields=32, max_part_size=len(body) + 1)
    except HTTPException as exc:  # python-multipart's complaint about a malformed body
        raise RequestError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        names = [name for name, _ in form.multi_items()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise RequestError(400, f"field(s) given more than once: {', '.join(repeated)}")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "no image: send the image file as the form field 'image'")
        image = await upload.read()
        fields = {}
        for name, value in form.items():
            if name == "image":
                continue
            if not isinstance(value, str):
                raise RequestError(400, f"field {name!r} must be text, not a file")
            fields[name] = value
        return image, fields
    finally:
        await form.close()


def _replay(body: bytes):
    """An ASGI ``receive`` that gives ``body`` (already read under the limits) to Starlette's form parser."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _json_fields(body: bytes) -> tuple[bytes, dict[str, Any]]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the JSON body must be an object with the image in 'image'")
    encoded = data.pop("image", None)
    if not isinstance(encoded, str) or not encoded:
        raise RequestError(400, "no image: send the image as base64 text in the JSON field 'image'")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode(encoded, validate=True), data
    except (binascii.Error, ValueError):
        raise RequestError(400, "the JSON field 'image' is not valid base64") from None


def _from_text(task: ServedTask, name: str, value: str) -> Any:
    """A form field as its value: arrays and numbers are written as JSON, text stays text."""
    spec = task.fields.get(name)
    if spec is None or spec.kind == "text":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        examples = {"array": "a JSON array such as [10, 20, 200, 180]", "integer": "an integer"}
        example = examples.get(spec.kind, "a number")
        raise RequestError(400, f"field {name!r} must be {example}, got {value[:80]!r}") from None


def _task_arguments(task: ServedTask, values: dict[str, Any]) -> dict[str, Any]:
    """Check names, kinds and required fields; the values themselves are the Predictor's to judge."""
    unknown = sorted(set(values) - set(task.fields))
    if unknown:
        known = ", ".join(["image", *task.fields])
        raise RequestError(400, f"unknown field(s) for {task.name}: {', '.join(unknown)} (it takes: {known})")
    arguments = {}
    for name, spec in task.fields.items():
        value = values.get(name)
        if value is None:
            if spec.required:
                raise RequestError(400, f"{task.name} needs the field {name!r}: {spec.description}")
            continue
        arguments[name] = _checked(name, spec.kind, value)
    return arguments


def _checked(name: str, kind: str, value: Any) -> Any:
    if kind == "text" and (not isinstance(value, str) or len(value) > MAX_TEXT):
        raise RequestError(400, f"field {name!r} must be text of at most {MAX_TEXT} characters")
    if kind == "array" and not isinstance(value, list):
        raise RequestError(400, f"field {name!r} must be a JSON array of numbers")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(400, f"field {name!r} must be an integer")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RequestError(400, f"field {name!r} must be a number")
    return value
