"""The HTTP server (``blip2 serve``): app, request schemas and parsing, micro-batching, the static page.

Needs the ``serve`` extra (FastAPI, uvicorn); import `blip2.serve.app` for ``create_app`` / ``serve``."""
