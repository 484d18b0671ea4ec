"""Dynamic batching under faults: the same answers batched as one by one, a bounded queue (503),
timeouts (504), clients that leave, and a batch that fails (500) while the server goes on."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from serve_helpers import PHOTOS, SAMPLES, metric, post, running

import pixelllm

IMAGES = [SAMPLES / "shapes1.png", SAMPLES / "shapes2.png", SAMPLES / "shapes3.png", PHOTOS / "rocket.jpg",
          PHOTOS / "chelsea.png", PHOTOS / "grace_hopper.jpg"]
MIXED = [
    *[("caption", image, {}) for image in IMAGES],
    *[("caption", image, {"box": "[5, 10, 120, 140]"}) for image in IMAGES[:4]],
    *[("locate", image, {"expression": text}) for image, text in zip(
        IMAGES, ["the orange square", "the yellow star", "the red square", "the white star", "a cat", "a man"],
        strict=True)],
    *[("segment", image, {"expression": text}) for image, text in zip(
        IMAGES[:5], ["the green hexagon", "the red hexagon", "the black hexagon", "the rocket", "the cat"],
        strict=True)],
    *[("densecap", image, {}) for image in IMAGES],
    *[("densecap", image, {"max_regions": "3"}) for image in IMAGES[::2]],
]


def concurrently(url, requests, workers=None):
    with ThreadPoolExecutor(workers or len(requests)) as pool:
        return list(pool.map(lambda r: post(url, r[0], r[1], **r[2]), requests))


def test_batched_answers_are_those_of_one_by_one(predictor):
    with running(predictor, max_batch=1) as url:
        alone = [post(url, task, image, **fields).json() for task, image, fields in MIXED]
        assert metric(url, "pixelllm_batch_size_sum") == len(MIXED)
    with running(predictor, max_batch=8, max_wait_ms=400) as url:
        batched = concurrently(url, MIXED)
        batches = metric(url, "pixelllm_batch_size_count")
    assert [r.status_code for r in batched] == [200] * len(MIXED)
    assert batches <= len(MIXED) / 2, f"{batches} batches for {len(MIXED)} requests: they were not gathered"
    for (task, image, fields), one, many in zip(MIXED, alone, batched, strict=True):
        assert many.json() == one, (task, image.name, fields)


def test_a_full_queue_answers_503_with_retry_after(predictor):
    with running(predictor, max_queue=2, max_batch=2, max_wait_ms=500) as url:
        answers = concurrently(url, [("caption", SAMPLES / "shapes1.png", {})] * 8)
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 4 and set(statuses) <= {200, 503}, statuses
        busy = next(r for r in answers if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and "queue full" in busy.json()["error"]
        assert metric(url, "pixelllm_queue_depth") == 0  # every place given back
        assert post(url, "caption", SAMPLES / "shapes1.png").status_code == 200


def test_a_request_past_its_timeout_gets_504_and_its_work_is_dropped(predictor):
    with running(predictor, timeout_s=0.2, max_batch=4, max_wait_ms=1000) as url:
        response = post(url, "densecap", SAMPLES / "shapes2.png")
        assert response.status_code == 504 and "timeout of 0.2 s" in response.json()["error"]
        time.sleep(1.2)  # past the batch's gathering time: a batch would have run by now
        assert metric(url, "pixelllm_batch_size_count") == 0
        assert metric(url, "pixelllm_queue_depth") == 0


def test_a_client_that_disconnects_frees_its_place(predictor):
    with running(predictor, max_queue=1, max_batch=2, max_wait_ms=1500) as url:
        with pytest.raises(httpx2.TimeoutException):  # waits for a second request that never comes, then leaves
            post(url, "caption", SAMPLES / "shapes1.png", timeout=0.4)
        time.sleep(0.2)
        assert metric(url, "pixelllm_queue_depth") == 0
        started = time.monotonic()
        response = post(url, "caption", SAMPLES / "shapes2.png")  # admitted: the place was given back
        assert response.status_code == 200
        assert time.monotonic() - started < 5
        assert metric(url, "pixelllm_batch_size_count") == 1  # the one that left never ran
        assert metric(url, "pixelllm_batch_size_sum") == 1
        assert 'status="499"' in httpx2.get(f"{url}/metrics").text


def test_a_failing_batch_answers_500_and_the_server_goes_on():
    broken = pixelllm.load()

    def fault(_module, _inputs):
        raise RuntimeError("a fault inside the mask head")

    heads = [m for m in broken.model.modules() if type(m).__name__ == "MaskHead"]
    assert heads, "the model has no MaskHead to break"
    for head in heads:
        head.register_forward_pre_hook(fault)
    requests = [("segment", image, {"expression": "the red circle"}) for image in IMAGES[:3]]
    requests += [("caption", image, {}) for image in IMAGES[:3]]
    with running(broken, max_batch=8, max_wait_ms=300) as url:
        answers = concurrently(url, requests)
        assert [r.status_code for r in answers] == [500] * 3 + [200] * 3
        assert all("a fault inside the mask head" in r.json()["error"] for r in answers[:3])
        assert httpx2.get(f"{url}/healthz").json() == {"status": "ok"}
        assert post(url, "locate", IMAGES[0], expression="the orange square").status_code == 200
        assert post(url, "segment", IMAGES[0], expression="the orange square").status_code == 500
