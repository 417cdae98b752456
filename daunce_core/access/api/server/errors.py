"""The error every endpoint raises: an HTTP status with an OpenAI-style error body."""

from __future__ import annotations

from typing import ClassVar


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status (400, 401, 404, 429, 500, 503).
        message: what is wrong and how to fix it.
        type: the OpenAI error type; by default from the status (``invalid_request_error``...).
        code: the OpenAI error code (``model_not_found``, ``invalid_api_key``...), or None.
        param: the request field at fault, or None.
    """

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        429: "rate_limit_exceeded",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or self.TYPES.get(status, "server_error")
        self.code = code
        self.param = param

    def body(self) -> dict:
        """The JSON body of the answer."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)
