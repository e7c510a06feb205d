"""The OpenAI error shape and the small helpers every request parser of the facade shares."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def type_name(value: Any) -> str:
    """A JSON value's type as the JSON spec names it, for error messages."""
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def bad(param: str, message: str) -> ApiError:
    """A 400 naming the request field `param`."""
    return ApiError(400, message, param=param)


def get_bool(body: dict, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        param = param or name
        raise bad(param, f"'{param}' must be a boolean, got {type_name(value)} {value!r:.80}")
    return value


def get_str(body: dict, name: str, param: str | None = None, required: bool = False) -> str | None:
    value = body.get(name)
    param = param or name
    if value is None and required:
        raise bad(param, f"'{param}' is required")
    if value is not None and not isinstance(value, str):
        raise bad(param, f"'{param}' must be a string, got {type_name(value)}")
    return value
