"""The search's trace: every step's beam, candidates, their lookahead text, scores and which survived,
as plain JSON (``docs/trace.md``).  The explorer page (``dealign serve``, ``GET /``) plays it back.

A ``TraceRecorder`` is handed to a search (``trace=`` of ``deal_search`` / ``run_search``); the search
calls it once per step with what it already computed, and the recorder turns that into JSON (decoding
the texts, which the search never needs).  Without a recorder the search makes none of these calls, so
recording costs nothing when off, and it never feeds back into the search, so the answer is the same.

``on_event(event)``, if given, is called with each part as soon as it exists -- ``{"type": "begin",
...header}``, ``{"type": "step", ...step}`` per step, ``{"type": "end", "answer", "stats"}`` -- which is
how the server streams a trace; the same parts put together (``doc()``) are the trace file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

FORMAT = "dealign-trace"
VERSION = 1


def _num(x: float | None) -> float | None:
    """JSON has no infinities: a -inf log-prob (a token the model rules out) becomes None."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


class TraceRecorder:
    """Collects one search's trace.  ``decode(ids) -> str`` is the policy's tokenizer; ``rewards`` the
    reward terms' names and weights; ``lam`` the reward's weight in the score."""

    def __init__(self, decode: Callable[[list[int]], str], *, prompt: Any = "", strategy: str = "deal",
                 settings: dict | None = None, rewards: dict[str, float] | None = None, lam: float = 0.0,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self.decode = decode
        self.header = {"format": FORMAT, "version": VERSION, "prompt": prompt, "strategy": strategy,
                       "settings": dict(settings or {}), "rewards": dict(rewards or {}), "lam": lam}
        self.steps: list[dict] = []
        self.answer: dict | None = None
        self.stats: dict | None = None
        self.on_event = on_event
        self._tokens: list[list[list[int]]] = []  # per step, each candidate's tokens (to find the answer's path)
        self._began = False

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def begin(self) -> None:
        if not self._began:
            self._began = True
            self._emit({"type": "begin", **self.header})

    # the searches call these -------------------------------------------------------------------
    def step(self, *, states: Sequence[tuple[list[int], float]], held: Sequence[tuple[list[int], float, str]],
             candidates: Sequence[dict], kept: Sequence[int], held_kept: Sequence[bool], mode: str, topk: int,
             lookahead: int) -> None:
        """One step.  ``states``: the live beam entering it, ``(tokens, logprob)``; ``held``: the
        finished states still in the beam, ``(tokens, score, text)``; ``candidates``: one dict per
        candidate with ``parent``, ``token``, ``span`` (the token and its rollout), ``committed`` (the
        tokens the candidate adds to its parent), ``logprob``, ``token_logprob``, ``rewards``,
        ``reward``, ``logp_part``, ``reward_part``, ``score``, ``finished`` and ``rank`` (its place in the
        step's ranking, 0 best, held states included); ``kept``: the indexes of the candidates that
        survive; ``held_kept``: which held states stay."""
        self.begin()
        texts = [self.decode(list(toks)) for toks, _ in states]
        out, toks_all = [], []
        kept_set = set(kept)
        for j, c in enumerate(candidates):
            prefix, base = states[c["parent"]][0], texts[c["parent"]]
            token_text = _after(self.decode(list(prefix) + [c["token"]]), base)
            full = self.decode(list(prefix) + list(c["span"]))
            toks_all.append(list(prefix) + list(c["committed"]))
            out.append({
                "parent": c["parent"], "token": c["token"], "text": token_text,
                "lookahead": _after(full, base + token_text), "logprob": _num(c["logprob"]),
                "token_logprob": _num(c["token_logprob"]),
                "rewards": {k: _num(v) for k, v in (c.get("rewards") or {}).items()},
                "reward": _num(c.get("reward")), "logp_part": _num(c.get("logp_part")),
                "reward_part": _num(c.get("reward_part")), "score": _num(c["score"]),
                "finished": bool(c.get("finished")), "kept": j in kept_set, "rank": c.get("rank"),
            })
        step = {
            "step": len(self.steps), "mode": mode, "topk": topk, "lookahead": lookahead,
            "states": [{"text": t, "tokens": len(toks), "logprob": _num(lp)} for (toks, lp), t in zip(states, texts)],
            "held": [{"text": text, "tokens": len(toks), "score": _num(score), "kept": bool(k)}
                     for (toks, score, text), k in zip(held, held_kept)],
            "candidates": out,
        }
        self.steps.append(step)
        self._tokens.append(toks_all)
        self._emit({"type": "step", **step})

    def finish(self, best: Any, stats: Any) -> None:
        """The answer (a ``Hypothesis``) and the cost; ``answer["path"]`` is the answer's candidate at
        each step it went through (the steps' dicts are never changed once recorded: they are streamed)."""
        self.begin()
        ids = list(best.token_ids)
        path = []
        for i, toks in enumerate(self._tokens):
            j = next((j for j, t in enumerate(toks) if t == ids[: len(t)] and len(t) <= len(ids)), None)
            if j is None:
                break
            path.append(j)
        self.answer = {"text": best.text, "tokens": len(ids), "finished": bool(best.finished),
                       "logprob": _num(best.logprob), "reward": _num(best.reward),
                       "rewards": {k: _num(v) for k, v in (best.rewards or {}).items()}, "score": _num(best.score),
                       "path": path}
        self.stats = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
        self._emit({"type": "end", "answer": self.answer, "stats": self.stats})

    # the result -------------------------------------------------------------------------------
    def doc(self) -> dict:
        """The whole trace (the file format, ``docs/trace.md``)."""
        return {**self.header, "steps": self.steps, "answer": self.answer, "stats": self.stats}


def _after(text: str, prefix: str) -> str:
    """What ``text`` adds to ``prefix`` (a tokenizer's clean-up may change the join: then all of it)."""
    return text[len(prefix):] if text.startswith(prefix) else text


def sampled_steps(recorder: TraceRecorder, tokens: list[int], token_logprobs: list[float]) -> None:
    """A one-candidate-per-step trace of a sampled answer (greedy, sample, best-of-n's pick): each
    step's only candidate is the token taken, kept."""
    lp = 0.0
    for i, (tok, tlp) in enumerate(zip(tokens, token_logprobs)):
        lp_before = lp
        lp += tlp
        recorder.step(states=[(tokens[:i], lp_before)], held=[], held_kept=[], kept=[0], mode="token", topk=1,
                      lookahead=0,
                      candidates=[{"parent": 0, "token": tok, "span": [tok], "committed": [tok], "logprob": lp,
                                   "token_logprob": tlp, "rewards": {}, "reward": None, "logp_part": lp,
                                   "reward_part": None, "score": lp, "finished": i == len(tokens) - 1, "rank": 0}])


def from_events(events: Sequence[dict]) -> dict:
    """The trace document that ``on_event`` parts add up to (``begin``, ``step``s, ``end``); a search
    cut short (a stop sequence) has no ``end``: its ``answer`` and ``stats`` are None."""
    doc: dict = {"steps": [], "answer": None, "stats": None}
    for event in events:
        body = {k: v for k, v in event.items() if k != "type"}
        if event["type"] == "step":
            doc["steps"].append(body)
        else:  # begin: the header; end: the answer and stats
            doc.update(body)
    return doc


def check(doc: Any) -> dict:
    """``doc`` if it is a trace this version reads; ``ValueError`` naming the problem otherwise."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a dealign trace (its \"format\" is not {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"trace version {doc.get('version')!r}; this dealign reads version {VERSION}")
    if not isinstance(doc.get("steps"), list):
        raise ValueError("a trace needs a list of \"steps\"")
    return doc


def save(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def load(path: str | Path) -> dict:
    return check(json.loads(Path(path).read_text(encoding="utf-8")))
