"""The HTTP application of ``pixelllm serve`` (INTERFACE.md, "HTTP"): the routes, errors and limits.

    app = create_app(pixelllm.load(), ServeSettings())

Every answer to ``POST /v1/{task}`` is the JSON of ``pixelllm <task> --json``; every error is
``{"error": str}`` with its status: 400 bad input, 401 no or wrong API key, 404 a task the loaded
model lacks, 408 a body that does not arrive in time, 413 an upload over the limit, 415 a body
that is neither multipart nor JSON, 499 (logged only) a client gone before its answer, 500 a batch
that failed, 503 with ``Retry-After`` a full queue, 504 a request past its timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from pixelllm import __version__
from pixelllm.data.images import load_image
from pixelllm.errors import InputError, PixelLLMError
from pixelllm.serve.batcher import Batcher, BatchFailed, QueueFull
from pixelllm.serve.metrics import Metrics
from pixelllm.serve.requests import CLIENT_GONE, RequestError, parse_request, read_body
from pixelllm.serve.tasks import OTHER_SYSTEMS, TASKS, ServedTask, answer_batch

STATIC = Path(__file__).resolve().parent / "static"
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"


@dataclass
class ServeSettings:
    """The limits and switches of ``pixelllm serve`` (its command-line options)."""

    model_name: str = "pixelllm (the embedded default)"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 32
    timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 16_000_000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()


def create_app(predictor, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``predictor``'s tasks under ``settings``."""
    metrics = Metrics()
    offered = {name: task for name, task in TASKS.items() if task.available(predictor)}
    batcher = Batcher(lambda name, items: answer_batch(offered[name], predictor, items),
                      max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    # /docs from the package's own copy of Swagger UI: nothing is fetched from outside the machine
    app = FastAPIOffline(title="pixelllm serve", version=__version__, lifespan=lifespan, redoc_url=None,
                         description="PixelLLM's tasks over HTTP: the same JSON as `pixelllm <task> --json`.")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    _add_page(app)
    _add_status_routes(app, metrics, offered, settings)
    for task in offered.values():
        _add_task_route(app, task, batcher, metrics, settings)
    _add_missing_task_route(app, offered, metrics, settings)
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return _error(400, "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "bad request")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}")


def _add_page(app: FastAPI) -> None:
    from pixelllm.demo import bundled_samples

    samples = {sample.path.name: sample for sample in bundled_samples()}
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/v1/samples", summary="The sample images that ship with the package")
    async def sample_list():
        return {"samples": [{"name": s.name, "url": f"/samples/{file}", "expression": s.expression,
                             "region": list(s.region)} for file, s in samples.items()]}

    @app.get("/samples/{file}", include_in_schema=False)
    async def sample(file: str):
        if file not in samples:  # only the listed files: no path from a client reaches the disk
            raise RequestError(404, f"no sample {file!r}")
        return FileResponse(samples[file].path)


def _add_status_routes(app: FastAPI, metrics: Metrics, offered: dict[str, ServedTask],
                       settings: ServeSettings) -> None:
    @app.get("/healthz", summary="{\"status\": \"ok\"} once the model is loaded")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus(request: Request):
        _authorize(request, settings.api_key)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/tasks", summary="The tasks of the loaded model and their fields")
    async def tasks():
        return {"model": settings.model_name, "max_upload_bytes": settings.max_upload_bytes,
                "tasks": {name: {"summary": task.summary,
                                 "fields": {f: {"kind": spec.kind, "required": spec.required,
                                                "description": spec.description} for f, spec in task.fields.items()}}
                          for name, task in offered.items()},
                "other_tasks": {name: system for name, system in OTHER_SYSTEMS.items() if name not in offered}}


def _add_task_route(app: FastAPI, task: ServedTask, batcher: Batcher, metrics: Metrics,
                    settings: ServeSettings) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            _authorize(request, settings.api_key)
            response = JSONResponse(await _answer(request, task, batcher, settings))
        except RequestError as exc:
            response = _error(exc.status, str(exc), exc.headers)
        metrics.observe_request(task.name, response.status_code, time.perf_counter() - started)
        return response

    app.add_api_route(f"/v1/{task.name}", endpoint, methods=["POST"], summary=task.summary,
                      openapi_extra={"requestBody": _request_body(task)}, responses=_ERROR_RESPONSES,
                      name=task.name)


def _add_missing_task_route(app: FastAPI, offered: dict[str, ServedTask], metrics: Metrics,
                            settings: ServeSettings) -> None:
    @app.post("/v1/{name}", include_in_schema=False)
    async def missing_task(request: Request, name: str):
        _authorize(request, settings.api_key)
        known = name in TASKS or name in OTHER_SYSTEMS
        metrics.observe_request(name if known else "unknown", 404, 0.0)
        offers = ", ".join(offered)
        if known:
            system = OTHER_SYSTEMS.get(name, "another system")
            message = f"the loaded model, {settings.model_name}, lacks the task {name!r} (a task of {system}); "
        else:
            message = f"unknown task {name!r}; "
        raise RequestError(404, message + f"this server offers: {offers}")


async def _answer(request: Request, task: ServedTask, batcher: Batcher, settings: ServeSettings) -> dict:
    """Read, admit, decode and queue one request; its answer, or ``RequestError`` with the status."""
    body = await read_body(request, settings.max_upload_bytes, settings.read_timeout_s)
    image_bytes, arguments = await parse_request(request, body, task)
    try:
        with batcher.admission():
            async with asyncio.timeout(settings.timeout_s):
                image = await asyncio.to_thread(_decode, image_bytes, settings.max_pixels)
                return await _unless_disconnected(request, batcher.submit(task.name, (image, arguments)))
    except QueueFull as exc:
        raise RequestError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except TimeoutError:
        raise RequestError(504, f"no answer within the timeout of {settings.timeout_s:g} s") from None
    except PixelLLMError as exc:
        raise RequestError(400, str(exc)) from None
    except BatchFailed as exc:
        raise RequestError(500, str(exc)) from None


def _decode(image_bytes: bytes, max_pixels: int):
    """``load_image`` of an upload; a decoder that fails in a way ``load_image`` does not name
    (Pillow's plugins raise assorted errors on malformed files) is still a bad image, not a fault."""
    try:
        return load_image(image_bytes, name="upload", max_pixels=max_pixels)
    except PixelLLMError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read image upload: {type(exc).__name__}: {exc}") from None


async def _unless_disconnected(request: Request, work):
    """Await ``work`` unless the client disconnects first (then abandon it and answer 499)."""
    answer = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answer.cancel()  # a no-op once answered; otherwise the batcher drops the request
    if not answer.done() or answer.cancelled():
        raise RequestError(CLIENT_GONE, "the client disconnected before its answer")
    return answer.result()


async def _disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read: only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})


def _request_body(task: ServedTask) -> dict:
    """The OpenAPI request body of ``task``: multipart with the image file, or JSON with base64."""
    json_kinds = {"text": {"type": "string"}, "array": {"type": "array", "items": {"type": "number"}},
                  "integer": {"type": "integer"}, "number": {"type": "number"}}
    required = ["image", *(name for name, spec in task.fields.items() if spec.required)]
    form = {name: {"type": "string", "description": spec.description + (" (a JSON array)" if spec.kind == "array"
                                                                          else "")}
            for name, spec in task.fields.items()}
    as_json = {name: {**json_kinds[spec.kind], "description": spec.description} for name, spec in task.fields.items()}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": required, "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"}, **form}}},
        "application/json": {"schema": {"type": "object", "required": required, "properties": {
            "image": {"type": "string", "format": "byte", "description": "the image file, base64"}, **as_json}}},
    }}


_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}
_ERROR_RESPONSES = {
    200: {"description": "the JSON of `pixelllm <task> --json` (INTERFACE.md)"},
    400: {"description": "bad input: an unreadable image, a box outside it, an empty expression, an unknown field",
          **_ERROR},
    401: {"description": "missing or wrong API key", **_ERROR},
    408: {"description": "the body did not arrive within the read timeout", **_ERROR},
    413: {"description": "the upload is over the size limit", **_ERROR},
    415: {"description": "the body is neither multipart/form-data nor JSON", **_ERROR},
    500: {"description": "the batch holding this request failed", **_ERROR},
    503: {"description": "the queue is full; retry after the Retry-After header's seconds", **_ERROR},
    504: {"description": "no answer within the request timeout", **_ERROR},
}
