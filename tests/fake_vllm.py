"""A stand-in for vLLM's OpenAI server, for tests: the exact ``/v1/completions`` request and response
schema the remote backend's ``vllm`` dialect relies on (token-id prompts, ``logprobs`` with
``"token_id:N"`` keys under ``return_tokens_as_token_ids``, ``n``, ``return_token_ids``, the
``--max-logprobs`` cap and its 400 error), plus ``/v1/models``, ``/tokenize`` and ``/health``,
backed by a local transformers model (no KV cache: every token re-encodes the sequence)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeVLLM:
    def __init__(self, model, tokenizer, *, name: str = "tiny", max_logprobs: int = 20) -> None:
        self.model, self.tokenizer, self.name, self.max_logprobs = model, tokenizer, name, max_logprobs
        self.eos = int(tokenizer.eos_token_id)
        self.lock, self.lock_count = threading.Lock(), threading.Lock()
        self.requests = 0
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0  # to see that the requests of a step overlap
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, {})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model",
                                                                        "max_model_len": 512}]})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = server.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    return self._send(200, {"count": len(ids), "max_model_len": 512, "tokens": ids})
                if self.path != "/v1/completions":
                    return self._send(404, {"detail": "Not Found"})
                with server.lock_count:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    code, obj = server.complete(body)
                finally:
                    with server.lock_count:
                        server.in_flight -= 1
                self._send(code, obj)

        ThreadingHTTPServer.request_queue_size = 128  # the backend opens many connections at once
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeVLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _error(message: str) -> tuple[int, dict]:
        return 400, {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}

    def complete(self, body: dict) -> tuple[int, dict]:
        self.requests += 1
        self.bodies.append(body)
        if body.get("model") != self.name:
            return 404, {"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                         "type": "NotFoundError", "param": None, "code": 404}
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return self._error("this fake only takes one token-id prompt")
        k = body.get("logprobs")
        if k is not None and k > self.max_logprobs:
            return self._error(f"Requested sample logprobs of {k}, which is greater than max allowed: {self.max_logprobs}")
        n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
        temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        gen = torch.Generator().manual_seed(int(body["seed"])) if body.get("seed") is not None else torch.Generator()
        choices = []
        for index in range(n):
            ids, toks, lps, tops, reason = list(prompt), [], [], [], "length"
            for _ in range(max_tokens):
                with self.lock, torch.inference_mode():
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                lp = torch.log_softmax(logits, -1)
                if temperature <= 0:
                    tok = int(lp.argmax())
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    if top_p < 1:
                        p, order = probs.sort(descending=True)
                        drop = (p.cumsum(0) - p) >= top_p
                        probs = probs.clone()
                        probs[order[drop]] = 0
                    tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.tokenizer.decode([t]))
                if k is not None:
                    vals, idx = lp.topk(k)
                    top = {name(int(i)): float(v) for v, i in zip(vals, idx)}
                    top[name(tok)] = float(lp[tok])  # vLLM always includes the sampled token
                    tops.append(top)
                toks.append(tok)
                lps.append(float(lp[tok]))
                ids.append(tok)
                if tok == self.eos and not body.get("ignore_eos"):
                    reason = "stop"
                    break
            logprobs = None if k is None else {
                "text_offset": list(range(len(toks))), "token_logprobs": lps,
                "tokens": [name(t) for t in toks], "top_logprobs": tops,
            }
            choices.append({"index": index, "text": self.tokenizer.decode(toks), "logprobs": logprobs,
                            "finish_reason": reason, "stop_reason": None, "prompt_logprobs": None,
                            "token_ids": toks if body.get("return_token_ids") else None,
                            "prompt_token_ids": prompt if body.get("return_token_ids") else None})
        completion = sum(len(c["logprobs"]["tokens"]) if c["logprobs"] else 0 for c in choices)
        return 200, {"id": f"cmpl-{self.requests}", "object": "text_completion", "created": int(time.time()),
                     "model": self.name, "choices": choices,
                     "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + completion,
                               "completion_tokens": completion, "prompt_tokens_details": None}}
