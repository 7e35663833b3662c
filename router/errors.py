"""Errors the API returns, in OpenAI's envelope:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Every failure a client can see is an ``APIError``; the HTTP layer turns it into
``(status, error_body(), headers)``. The helpers below fix the status, type and code
of each case so that two code paths never describe the same failure differently.
Types and codes follow what OpenAI itself returns where it is known (401 and 404 are
``invalid_request_error`` there, not a type of their own).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "requests"  # OpenAI's type for a request-rate 429


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def error_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return (
            f"APIError({self.status}, {self.message!r}, type={self.type!r}, param={self.param!r}"
            f", code={self.code!r})"
        )


# ---------------------------------------------------------------- 400 invalid request


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def invalid_json(detail: str | None = None) -> APIError:
    message = "We could not parse the JSON body of your request."
    if detail:
        message += f" ({detail})"
    return APIError(400, message, INVALID_REQUEST)


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, "unsupported_parameter")


# pydantic error types that mean "wrong JSON type" rather than "wrong value", and the
# type that was expected.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean",
    "bool_parsing": "a boolean", "string_type": "a string", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}
# Error types our own validators raise (PydanticCustomError) that are also OpenAI codes.
_OWN_CODES = {"unsupported_parameter", "unsupported_value", "invalid_value", "invalid_type"}


def from_validation_error(err: ValidationError) -> APIError:
    """A 400 for the first problem pydantic found: the field path in ``param`` and in
    the message, then what is wrong. OpenAI reports one problem at a time too."""
    first = err.errors(include_url=False)[0]
    path = field_path(first["loc"])
    kind = first["type"]
    if kind == "missing":
        message = f"Missing required parameter: '{path}'."
        return APIError(400, message, INVALID_REQUEST, path, "missing_required_parameter")
    if kind in _EXPECTED:
        code = "invalid_type"
        problem = f"expected {_EXPECTED[kind]}, but got {_json_type(first.get('input'))} instead"
        message = f"Invalid type for '{path}': {problem}."
    else:
        code = kind if kind in _OWN_CODES else "invalid_value"
        problem = _problem(first)
        message = f"Invalid {'type' if code == 'invalid_type' else 'value'} for '{path}': {problem}."
    if not path:
        message = f"Invalid request body: {problem}."
    more = err.error_count() - 1
    if more:
        message += f" ({more} more problem{'s' if more > 1 else ''} in the request.)"
    return APIError(400, message, INVALID_REQUEST, path or None, code)


def field_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problem(error: dict[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ").rstrip(".")
    if error["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg += f", got {_short(error.get('input'))}"
    return msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, max_tokens: int | None, chat: bool = True
) -> APIError:
    """Prompt plus requested completion do not fit the model's context. Both numbers
    are in the message so the client can see which one to cut."""
    where = "messages" if chat else "prompt"
    if max_tokens:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your {where} "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the {where}."
        )
    return APIError(400, message, INVALID_REQUEST, where, "context_length_exceeded")


# ---------------------------------------------------------------- 401 / 404


def invalid_api_key(provided: str | None) -> APIError:
    """Missing or wrong key. Never echoes the key beyond its last four characters."""
    if not provided:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = f"Incorrect API key provided: ****{provided[-4:] if len(provided) > 8 else ''}."
    return APIError(401, message, INVALID_REQUEST, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> APIError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return APIError(404, message, INVALID_REQUEST, "model", "model_not_found")


def invalid_url(method: str, path: str) -> APIError:
    return APIError(404, f"Invalid URL ({method} {path})", INVALID_REQUEST)


def payload_too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"The request body is {size} bytes; this server accepts at most {limit}.",
                    INVALID_REQUEST, None, "request_too_large")


# ---------------------------------------------------------------- 429 / 503 / 500


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def rate_limited(retry_after_s: float, message: str | None = None) -> APIError:
    message = message or f"Rate limit reached. Please try again in {max(1, math.ceil(retry_after_s))}s."
    return APIError(429, message, RATE_LIMIT, None, "rate_limit_exceeded", _retry_after(retry_after_s))


def overloaded(retry_after_s: float, message: str | None = None) -> APIError:
    """The cluster has no room for the request now (queues full, no healthy worker)."""
    message = message or "The server is currently overloaded, please try again later."
    return APIError(503, message, SERVER_ERROR, None, "overloaded", _retry_after(retry_after_s))


def internal_error(message: str | None = None) -> APIError:
    message = message or "The server had an error while processing your request. Sorry about that!"
    return APIError(500, message, SERVER_ERROR)
