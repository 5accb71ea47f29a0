"""A small in-process stand-in for vLLM's OpenAI server, for fast unit tests of the served-teacher client: the
endpoints and answer shapes llm-neo reads, a bigram "model" (log-softmax of a fixed table row per token) and
switches for the faults a real server shows. The equality and fault tests run against real vLLM
(tests/e2e/test_served_teacher.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class StandInServer:
    def __init__(self, tokenizer, models=("teacher",), max_logprobs: int = 20, seed: int = 0, api_key: str | None = None):
        self.tokenizer, self.models, self.max_logprobs, self.api_key = tokenizer, list(models), max_logprobs, api_key
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(len(tokenizer), len(tokenizer), generator=generator) * 3, dim=-1)
        self.failures = 0  # answer this many requests with HTTP 500 first
        self.corrupt = None  # callable(prompt_logprobs list) -> list, applied to completions answers
        self.raw = None  # callable(handler, answer bytes): writes a completions answer's bytes itself (HTTP faults)
        self.requests: list[tuple[str, dict]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def expected(self, token_ids: list[int], k: int):
        """The stand-in model's top-k after each token (what a client must return), as (ids, log-probs)."""
        top = self.table[torch.tensor(token_ids)].topk(k, dim=-1)
        return top.indices, top.values

    def _answer(self, path: str, body: dict) -> tuple[int, dict]:
        if self.failures > 0:
            self.failures -= 1
            return 500, {"error": {"message": "engine is restarting", "code": 500}}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        if body.get("model") not in self.models:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return 200, {"count": len(ids), "tokens": ids}
        if path == "/detokenize":
            return 200, {"prompt": self.tokenizer.decode(body["tokens"])}
        if path == "/v1/completions":
            return self._completion(body)
        return 404, {"error": {"message": f"no route {path}"}}

    def _completion(self, body: dict) -> tuple[int, dict]:
        k, prompt = body["prompt_logprobs"], body["prompt"]
        if k > self.max_logprobs:
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                              f"{self.max_logprobs}", "code": 400}}
        positions = [None]
        for t in range(1, len(prompt)):
            row = self.table[prompt[t - 1]]
            order = row.argsort(descending=True)
            ranks = {int(token): rank + 1 for rank, token in enumerate(order.tolist())}
            # vLLM's order: the position's own next token first, then the top-k by rank (a token in both, once)
            entry = {str(prompt[t]): {"logprob": float(row[prompt[t]]), "rank": ranks[prompt[t]]}}
            for token in order[:k].tolist():
                entry.setdefault(str(token), {"logprob": float(row[token]), "rank": ranks[token]})
            positions.append(entry)
        if self.corrupt is not None:
            positions = self.corrupt(positions)
        return 200, {"choices": [{"text": "", "prompt_logprobs": positions}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                server.requests.append((self.path, {**body, "authorization": self.headers.get("Authorization")}))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    status, answer = 401, {"error": {"message": "Unauthorized", "code": 401}}
                else:
                    status, answer = server._answer(self.path, body)
                data = json.dumps(answer).encode()
                if server.raw is not None and self.path == "/v1/completions" and status == 200:
                    server.raw(self, data)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply("GET")

            def do_POST(self):
                self._reply("POST")

            def log_message(self, *args):
                pass

        return Handler
