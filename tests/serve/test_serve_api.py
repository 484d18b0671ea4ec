"""``pixelllm serve``'s HTTP contract (INTERFACE.md): the CLI's JSON for every task, and for every
bad request its status and ``{"error": str}``."""

import base64
import json
import struct
import zlib

import httpx2
import pytest
from serve_helpers import PHOTOS, SAMPLES, metric, post, running

from pixelllm.cli import main
from pixelllm.serve.server import check_binding
from pixelllm.serve.tasks import OTHER_SYSTEMS

# (task, image, form fields, the same request as CLI arguments after the image)
REQUESTS = [
    ("caption", SAMPLES / "shapes1.png", {}, []),
    ("caption", PHOTOS / "rocket.jpg", {"box": "[10, 20, 200, 180]"}, ["--box", "10", "20", "200", "180"]),
    ("caption", SAMPLES / "shapes2.png", {"point": "[200, 170]"}, ["--point", "200", "170"]),
    ("caption", SAMPLES / "shapes3.png", {"prompt": "an object of"}, ["--prompt", "an object of"]),
    ("locate", SAMPLES / "shapes3.png", {"expression": "the black hexagon above the red square"},
     ["the black hexagon above the red square"]),
    ("locate", SAMPLES / "shapes1.png", {"expression": "the red circle", "min_score": "0.001"},
     ["the red circle", "--min-score", "0.001"]),
    ("segment", PHOTOS / "chelsea.png", {"expression": "the cat"}, ["the cat"]),
    ("densecap", PHOTOS / "grace_hopper.jpg", {"max_regions": "5"}, ["--max-regions", "5"]),
    ("densecap", SAMPLES / "shapes1.png", {"min_score": "0.1"}, ["--min-score", "0.1"]),
]


def cli_json(capsys, task, image, arguments) -> dict:
    code = main([task, str(image), *arguments, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("task, image, fields, arguments", REQUESTS, ids=[f"{r[0]}-{r[1].stem}" for r in REQUESTS])
def test_every_task_answers_the_cli_json(url, capsys, task, image, fields, arguments):
    response = post(url, task, image, **fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == cli_json(capsys, task, image, arguments)


def test_a_json_body_with_base64_answers_as_the_form(url):
    image = SAMPLES / "shapes2.png"
    form = post(url, "segment", image, expression="the yellow star").json()
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "expression": "the yellow star"}
    assert httpx2.post(f"{url}/v1/segment", json=body, timeout=60).json() == form
    body["image"] = "data:image/png;base64," + body["image"]
    assert httpx2.post(f"{url}/v1/segment", json=body, timeout=60).json() == form
    boxed = {"image": body["image"], "box": [20, 30, 200, 220]}
    assert httpx2.post(f"{url}/v1/caption", json=boxed, timeout=60).json() == post(
        url, "caption", image, box="[20, 30, 200, 220]").json()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels and holds almost nothing (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


SHAPES = (SAMPLES / "shapes1.png").read_bytes()
BAD_REQUESTS = [  # (name, method, path, httpx arguments, status, part of the message)
    ("unknown task", "post", "/v1/nonsense", {"files": {"image": ("i", SHAPES)}}, 404, "unknown task 'nonsense'"),
    ("not an image", "post", "/v1/caption", {"files": {"image": ("i", b"hello world")}}, 400, "cannot read image"),
    ("truncated image", "post", "/v1/caption", {"files": {"image": ("i", SHAPES[: len(SHAPES) // 2])}}, 400,
     "truncated"),
    ("bomb", "post", "/v1/caption", {"files": {"image": ("i", png_header(100_000, 100_000))}}, 400, "pixels"),
    ("no image", "post", "/v1/caption", {"data": {"box": "[1, 2, 3, 4]"}, "files": {"other": ("i", SHAPES)}}, 400,
     "no image"),
    ("image as text", "post", "/v1/caption", {"data": {"image": "abc"}, "files": {"x": ("i", b"")}}, 400, "no image"),
    ("unknown field", "post", "/v1/locate", {"files": {"image": ("i", SHAPES)}, "data": {"expression": "a",
                                                                                        "colour": "red"}}, 400,
     "unknown field(s) for locate: colour"),
    ("missing expression", "post", "/v1/segment", {"files": {"image": ("i", SHAPES)}}, 400, "needs the field"),
    ("empty expression", "post", "/v1/locate", {"files": {"image": ("i", SHAPES)}, "data": {"expression": " "}}, 400,
     "empty expression"),
    ("box outside", "post", "/v1/caption", {"files": {"image": ("i", SHAPES)}, "data": {"box": "[0, 0, 9999, 10]"}},
     400, "extends past the right edge of the 431x255 image"),
    ("box not JSON", "post", "/v1/caption", {"files": {"image": ("i", SHAPES)}, "data": {"box": "1 2 3 4"}}, 400,
     "JSON array"),
    ("box of 3", "post", "/v1/caption", {"files": {"image": ("i", SHAPES)}, "data": {"box": "[1, 2, 3]"}}, 400,
     "box must be 4"),
    ("box and point", "post", "/v1/caption", {"files": {"image": ("i", SHAPES)},
                                              "data": {"box": "[1, 2, 30, 40]", "point": "[5, 5]"}}, 400, "not both"),
    ("max_regions 0", "post", "/v1/densecap", {"files": {"image": ("i", SHAPES)}, "data": {"max_regions": "0"}}, 400,
     "at least 1"),
    ("max_regions text", "post", "/v1/densecap", {"files": {"image": ("i", SHAPES)}, "data": {"max_regions": "x"}},
     400, "an integer"),
    ("min_score text", "post", "/v1/locate", {"files": {"image": ("i", SHAPES)},
                                              "data": {"expression": "a", "min_score": "x"}}, 400, "a number"),
    ("min_score 2", "post", "/v1/densecap", {"files": {"image": ("i", SHAPES)}, "data": {"min_score": "2"}}, 400,
     "min_score must be a number from 0 to 1"),
    ("repeated field", "post", "/v1/locate", {"files": [("image", ("i", SHAPES)), ("expression", (None, "a")),
                                                        ("expression", (None, "b"))]}, 400, "more than once"),
    ("two images", "post", "/v1/caption", {"files": [("image", ("i", SHAPES)), ("image", ("j", SHAPES))]}, 400,
     "Too many files"),
    ("long text", "post", "/v1/locate", {"files": {"image": ("i", SHAPES)}, "data": {"expression": "a " * 2000}}, 400,
     "at most 2000"),
    ("form without files", "post", "/v1/caption", {"data": {"box": "[1, 2, 3, 4]"}}, 415,
     "it is application/x-www-form-urlencoded"),
    ("no content type", "post", "/v1/caption", {"content": SHAPES}, 415, "it is untyped"),
    ("broken multipart", "post", "/v1/caption",
     {"content": b"--xx\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
      "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 400, "image"),
    ("JSON not an object", "post", "/v1/caption", {"json": [1, 2]}, 400, "must be an object"),
    ("JSON broken", "post", "/v1/caption",
     {"content": b"{\"image\": ", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("JSON bad base64", "post", "/v1/caption", {"json": {"image": "%%%"}}, 400, "not valid base64"),
    ("JSON box as text", "post", "/v1/caption", {"json": {"image": base64.b64encode(SHAPES).decode(), "box": "x"}},
     400, "JSON array"),
    ("JSON path as image", "post", "/v1/caption", {"json": {"image": "/etc/passwd"}}, 400, "image"),
    ("wrong method", "get", "/v1/caption", {}, 405, "Method Not Allowed"),
    ("unknown path", "get", "/nothing/here", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("name, method, path, arguments, status, message", BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_a_bad_request_gets_its_status_and_a_json_error(url, name, method, path, arguments, status, message):
    response = getattr(httpx2, method)(f"{url}{path}", timeout=60, **arguments)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"], response.json()


@pytest.mark.parametrize("task", sorted(OTHER_SYSTEMS))
def test_a_task_of_another_system_names_it(url, task):
    response = post(url, task, SHAPES)
    assert response.status_code == 404
    assert f"lacks the task {task!r}" in response.json()["error"] and OTHER_SYSTEMS[task] in response.json()["error"]


def test_uploads_over_the_limit_get_413_whether_announced_or_streamed(predictor):
    with running(predictor, max_upload_bytes=50_000) as url:
        big = (PHOTOS / "rocket.jpg").read_bytes()
        assert len(big) > 50_000
        response = post(url, "caption", big)
        assert response.status_code == 413 and "over the limit of 50,000" in response.json()["error"]

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        streamed = httpx2.post(f"{url}/v1/caption", content=chunks(), timeout=60,
                               headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "over the limit" in streamed.json()["error"]
        assert post(url, "caption", SHAPES).status_code == 200


def test_images_over_the_pixel_limit_get_400(predictor):
    with running(predictor, max_pixels=100_000) as url:
        response = post(url, "caption", PHOTOS / "rocket.jpg")  # 640 x 427 = 273,280 pixels
        assert response.status_code == 400 and "over the limit of 100,000" in response.json()["error"]


def test_with_an_api_key_every_api_request_needs_it(predictor):
    with running(predictor, api_key="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = post(url, "caption", SHAPES, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]
            assert httpx2.get(f"{url}/metrics", headers=headers).status_code == 401
            assert post(url, "detect", SHAPES, headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert post(url, "caption", SHAPES, headers=good).status_code == 200
        assert httpx2.get(f"{url}/metrics", headers=good).status_code == 200
        assert httpx2.get(f"{url}/healthz").json() == {"status": "ok"}  # the page and health need no key
        assert httpx2.get(f"{url}/").status_code == 200


def test_binding_beyond_the_loopback_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("PIXELLLM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: binding 0.0.0.0") and "--api-key" in err[0]
    check_binding("0.0.0.0", "a key")  # accepted (nothing is bound here)
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("localhost", None)


def test_cors_only_when_asked(url, predictor):
    origin = {"Origin": "http://elsewhere.test"}
    assert "access-control-allow-origin" not in httpx2.get(f"{url}/healthz", headers=origin).headers
    with running(predictor, cors_origins=("http://elsewhere.test",)) as allowed:
        headers = httpx2.get(f"{allowed}/healthz", headers=origin).headers
        assert headers["access-control-allow-origin"] == "http://elsewhere.test"


def test_health_metrics_docs_and_page(url):
    assert httpx2.get(f"{url}/healthz").json() == {"status": "ok"}
    post(url, "locate", SHAPES, expression="the orange square")
    text = httpx2.get(f"{url}/metrics").text
    for name in ("pixelllm_requests_total", "pixelllm_request_seconds_bucket", "pixelllm_queue_depth",
                 "pixelllm_batch_size_bucket"):
        assert name in text
    assert metric(url, "pixelllm_requests_total") >= 1
    docs = httpx2.get(f"{url}/docs").text
    assert "swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert httpx2.get(f"{url}/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    paths = httpx2.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/caption", "/v1/locate", "/v1/segment", "/v1/densecap"} <= set(paths)
    form = paths["/v1/locate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "expression"]
    page = httpx2.get(f"{url}/")
    assert "shapes world" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "rle.js", "style.css"):
        assert httpx2.get(f"{url}/static/{asset}").status_code == 200
    assert "//" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    tasks = httpx2.get(f"{url}/v1/tasks").json()
    assert list(tasks["tasks"]) == ["caption", "locate", "segment", "densecap"]
    assert tasks["other_tasks"] == OTHER_SYSTEMS


def test_only_the_bundled_samples_are_served(url):
    samples = httpx2.get(f"{url}/v1/samples").json()["samples"]
    assert {s["name"] for s in samples} >= {"shapes1", "shapes2", "shapes3"}
    assert httpx2.get(url + samples[0]["url"]).content == (SAMPLES / samples[0]["url"].split("/")[-1]).read_bytes()
    for path in ("/samples/samples.json", "/samples/..%2Fdefault%2Fconfig.json", "/samples/../default/config.json",
                 "/static/..%2F..%2Fassets%2Fdefault%2Fconfig.json", "/static/../tasks.py"):
        response = httpx2.get(url + path)
        assert response.status_code == 404 and "error" in response.json(), path


def test_a_model_with_a_codebook_serves_segment_all_as_the_cli(capsys, tmp_path):
    from helpers import codebook_model

    import pixelllm

    codebook_model(seed=1, max_new_tokens=24).save_pretrained(tmp_path / "codebook")
    with running(pixelllm.load(tmp_path / "codebook")) as address:
        assert "segment_all" in httpx2.get(f"{address}/v1/tasks").json()["tasks"]
        response = post(address, "segment_all", PHOTOS / "chelsea.png", query="all the cats")
        assert response.status_code == 200, response.text
        assert response.json() == cli_json(capsys, "segment", PHOTOS / "chelsea.png",
                                           ["all the cats", "--all", "--model", str(tmp_path / "codebook")])
        assert post(address, "segment_all", PHOTOS / "chelsea.png").status_code == 400  # the query is required
