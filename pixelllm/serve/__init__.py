"""``pixelllm serve``: the tasks over HTTP with dynamic batching, and a web page (docs/serving.md).

- ``tasks``: the table of served tasks (one entry per task) and how each answers a batch.
- ``batcher``: gathers requests of a task into batches, one batch at a time in a worker thread.
- ``requests``: reading a request (size limit, deadline, multipart or JSON) into an image and fields.
- ``app``: the FastAPI routes, errors, API key and limits; ``metrics``: the Prometheus metrics.
- ``server``: uvicorn, the binding rule and graceful shutdown; ``static/``: the page.
"""
