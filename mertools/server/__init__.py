"""`mertools serve`: an OpenAI-compatible HTTP API with SSE streaming and continuous batching.

- `scheduler` continuous batching over `Engine.step` (no HTTP)
- `protocol` request validation and response shapes (no HTTP, no engine)
- `app` the FastAPI routes, auth and error handling; `metrics` Prometheus metrics (prometheus_client); `cli` the command

Nothing here is imported by `mertools` itself until `serve` runs, so the CLI starts without FastAPI.
"""
