"""Error types that name what went wrong in the user's own terms (file, row, field, option)."""

from __future__ import annotations

import json


class NeoError(Exception):
    """Base class for errors the user can fix; the CLI prints them without a traceback."""


class ConfigError(NeoError):
    """A configuration value or option is unknown or impossible."""


class DataError(NeoError):
    """A data row cannot be used. Carries the file, the 1-based row number and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, message
        where = ", ".join(
            part
            for part in (
                f"file {source}" if source else "",
                f"row {row}" if row is not None else "",
                f"field '{field}'" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class VocabularyError(NeoError):
    """Teacher and student cannot be distilled because their vocabularies differ."""


class NonFiniteError(NeoError):
    """A step produced a NaN or infinite loss or gradient and the policy says stop."""


class TrainingOutOfMemory(NeoError):
    """The device ran out of memory during training."""


class DiskFullError(NeoError):
    """The disk filled up while a run was writing; names the file and the checkpoint to resume from."""


class ServerError(NeoError):
    """An inference server did not answer, or answered with an error (its own message is kept). ``role`` says
    which server in messages ("teacher server", "rollout server")."""

    role = "server"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.reason, self.status, self.retryable = reason or message, status, retryable

    @classmethod
    def from_answer(cls, url: str, status: int, body: bytes) -> ServerError:
        """An HTTP error answer, with the server's own message when it gives one (OpenAI's error object)."""
        try:
            reason = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = body.decode("utf-8", "replace").strip()[:300] or f"HTTP {status}"
        return cls(f"{cls.role} {url} answered HTTP {status}: {reason}", reason=reason, status=status,
                   retryable=status >= 500 or status == 429)


class TeacherServerError(ServerError):
    """The teacher server did not answer, or answered with an error."""

    role = "teacher server"


class RolloutServerError(ServerError):
    """The rollout server (vLLM serving the student's base with its adapter) did not answer, or answered with an
    error."""

    role = "rollout server"
