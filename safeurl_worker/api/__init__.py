"""`safeurl-worker api`: the HTTP service next to the workers (docs/api.md).

`app` (FastAPI) and `server` (uvicorn) are imported only by the `api` command, so the worker and
the other commands do not load them; `config` is light.
"""
