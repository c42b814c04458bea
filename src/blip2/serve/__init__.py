"""The HTTP server (``blip2 serve``). Needs the ``serve`` extra (FastAPI, uvicorn).

- `blip2.serve.app`: ``create_app(model, ServeConfig(...))``, the routes and what they share;
- `blip2.serve.server`: ``serve`` (load a model, run uvicorn), ``background_server`` (tests, benchmarks),
  uvicorn's settings with a header deadline and a connection cap;
- `blip2.serve.config`: ``ServeConfig``, every limit and timeout; `blip2.serve.schemas`: request and
  response models; `blip2.serve.parsing`: multipart/JSON bodies, base64, image decoding with size guards;
  `blip2.serve.limits`: the request-body size and time limits; `blip2.serve.errors`: the JSON errors;
- `blip2.serve.jobs`: what a request becomes for the model; `blip2.serve.batching`: micro-batching;
  ``static/``: the web page.
"""
