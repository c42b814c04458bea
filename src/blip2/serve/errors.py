"""Every error the server answers is JSON, ``{"error": "..."}``: `ApiError` and the app's exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no such path '{request.url.path}'; the API is described at /docs"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on '{request.url.path}'; the API is described at /docs"
    return error_response(exc.status_code, message, getattr(exc, "headers", None))


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))


async def _disconnected(request: Request, exc: Exception) -> Response:
    """A client gone mid-upload is an everyday event, not a bug: one line in the log, no traceback."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.info("%s closed the connection during %s %s; request dropped", client, request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it; the status is nginx's "client closed request"


async def _unexpected(request: Request, exc: Exception) -> Response:
    # No log.exception here: Starlette re-raises after this handler so that the server (uvicorn) logs the
    # traceback; logging it here too printed every bug's traceback twice.
    return error_response(500, f"internal error ({type(exc).__name__}: {exc})")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as JSON; 404/405 and validation errors point at /docs."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(Exception, _unexpected)
