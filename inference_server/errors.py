"""The error every request-parsing step raises; the HTTP layer turns it into a JSON 4xx."""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake: HTTP `status`, a machine-readable `code`, the offending `field` (or None)."""

    def __init__(self, status: int, code: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.message = message

    def to_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}
