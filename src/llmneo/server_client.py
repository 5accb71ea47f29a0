"""JSON over HTTP to an OpenAI-compatible inference server (vLLM): each request answered whole within a deadline,
tried again after a transport fault, a timeout or a 5xx/429 answer (backoff 1, 2, 4... s), with the API key from a
named environment variable. The served teacher (teacher/server.py) and the rollout server (rollout_engines.py)
each hold one; ``ServerSettings.option`` names that server's flags in every message."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

from .errors import ConfigError, ServerError

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """How to reach one server (the ``--teacher_server*`` or ``--rollout_server*`` options)."""

    url: str  # the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the served model name; None: the server's only model
    api_key_env: str | None = None  # the environment variable holding the API key, if the server wants one
    timeout: float = 120.0  # seconds one whole answer may take (connecting, sending and reading it all)
    retries: int = 4  # further tries of a request that failed to connect, timed out or got a 5xx answer
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    option: str = "--teacher_server"  # the flag that names this server (its other flags extend it)

    @classmethod
    def from_config(cls, training, option: str = "teacher_server") -> ServerSettings:
        """The settings of the server ``option`` names (``teacher_server`` or ``rollout_server``) in ``training``."""
        read = lambda suffix: getattr(training, option + suffix)  # noqa: E731
        return cls(read(""), read("_model"), read("_api_key_env"), read("_timeout"), read("_retries"),
                   option=f"--{option}")

    def api_key(self) -> str | None:
        """The key from the named environment variable: one that is missing or empty is refused, each by name."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        flag = f"{self.option}_api_key_env {self.api_key_env}"
        if key is None:
            raise ConfigError(f"{flag}: that environment variable is not set")
        if not key.strip():
            raise ConfigError(f"{flag}: that environment variable is set but empty; put the server's API key in it")
        return key.strip()


class JsonClient:
    """Requests to one server; failures raise ``error`` (a ServerError subclass naming the server's role)."""

    def __init__(self, settings: ServerSettings, error: type[ServerError]):
        self.settings, self.error = settings, error

    def request(self, method: str, url: str, payload: dict | None = None, tries: int | None = None,
                text: bool = False) -> dict | str:
        """One JSON request; a failed connection, a timeout or a 5xx answer is tried again after a backoff.
        ``text``: the answer is plain text (vLLM's adapter endpoints), returned as it is."""
        tries = self.settings.retries + 1 if tries is None else tries
        for attempt in range(tries):
            try:
                return self._send(method, url, payload, text)
            except ServerError as error:
                if not error.retryable or attempt == tries - 1:
                    if attempt:
                        error.args = (f"{error} (after {attempt + 1} tries)",)
                    raise
                delay = self.settings.backoff * 2 ** attempt
                logger.warning("%s %s: %s; trying again in %.0f s", self.error.role, url, error.reason, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def served_model(self, base_url: str, kind: str = "models", keep=lambda entry: True) -> dict:
        """The ``/models`` entry of the settings' model (None: the only one of ``kind`` that ``keep`` takes), checked
        before anything loads: the server answers (not retried: a server that is not there is named in one line)
        and serves that model."""
        where = f"{self.error.role} {self.settings.url}"
        try:
            listed = self.request("GET", f"{base_url}/models", tries=1)
        except ServerError as error:
            if error.status is not None:  # it answered, with an error of its own
                raise
            raise self.error(f"{where} is not reachable: {error.reason}") from None
        found = {entry.get("id"): entry for entry in listed.get("data", []) if keep(entry)}
        wanted = self.settings.model
        if wanted is None:
            if len(found) != 1:
                raise ConfigError(f"{where} serves {len(found)} {kind} ({', '.join(found)}): name one with "
                                  f"{self.settings.option}_model")
            return next(iter(found.values()))
        if wanted not in found:
            raise ConfigError(f"{where} does not serve '{wanted}'; it serves {', '.join(found) or 'no ' + kind}")
        return found[wanted]

    def _send(self, method: str, url: str, payload: dict | None, text: bool = False) -> dict | str:
        headers = {"Content-Type": "application/json"}
        key = self.settings.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload).encode() if payload is not None else None
        status, body = self._exchange(method, url, data, headers)
        if status >= 400:
            raise self._refusal(url, status, body)
        if text:
            return body.decode("utf-8", "replace")
        try:
            return json.loads(body, object_pairs_hook=_unique_keys)
        except ValueError as error:  # not JSON, or a key given twice
            raise self.error(f"{self.error.role} {url} answered with something that is not valid JSON "
                             f"({error})") from None

    def _refusal(self, url: str, status: int, body: bytes) -> ServerError:
        error = self.error.from_answer(url, status, body)
        if status in (401, 403):
            hint = (f"the server refused the key in ${self.settings.api_key_env}: check it"
                    if self.settings.api_key_env else
                    "the server wants an API key: put it in an environment variable and name that variable with "
                    f"{self.settings.option}_api_key_env")
            error.args = (f"{error}; {hint}",)
        return error

    def _exchange(self, method: str, url: str, data: bytes | None, headers: dict) -> tuple[int, bytes]:
        """One HTTP request and its whole answer within the timeout: a watchdog shuts the socket at the deadline,
        so a server that answers slowly (a byte at a time) cannot hold the run past it. Transport faults (refused,
        reset, a malformed status line, a body shorter than its Content-Length, the deadline) are retryable."""
        timeout = self.settings.timeout
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=timeout)
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, OSError) as error:
            reason = (f"no whole answer within {timeout:g} s ({self.settings.option}_timeout)" if expired.is_set()
                      else _transport_reason(error))
            raise self.error(f"{self.error.role} {url}: {reason}", reason=reason, retryable=True) from None
        finally:
            watchdog.cancel()
            connection.close()


def _transport_reason(error: Exception) -> str:
    if isinstance(error, http.client.IncompleteRead):
        return (f"the answer broke off after {len(error.partial)} bytes"
                + (f", {error.expected} more were announced" if error.expected is not None else ""))
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(error, http.client.BadStatusLine):
        return f"the server answered with a malformed status line {str(error)[:80]!r}"
    if isinstance(error, http.client.HTTPException):
        return f"the server's answer is not valid HTTP ({type(error).__name__}: {str(error)[:120]})"
    return str(getattr(error, "reason", None) or error) or type(error).__name__


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique: an answer naming one token twice at a position is malformed."""
    found = dict(pairs)
    if len(found) != len(pairs):
        twice = sorted({key for key, _ in pairs if sum(other == key for other, _ in pairs) > 1})
        raise ValueError(f"key {twice[0]!r} appears twice in one object")
    return found
