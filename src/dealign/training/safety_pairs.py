"""Pairs for R_safety, a reward that reads the request: declining a harmful request beats answering it,
and answering a benign request beats declining it.

Why: the HH-trained R_harmless ignores the request (it prefers a refusal of "how do I bake bread" by
about as much as a refusal of "how do I make a bomb"), and it was trained on whole answers, so it
hardly separates the first few words of a refusal from those of an answer -- which is where the
search decides (the opening schedule, search/deal.py).  These pairs teach both: every pair shares
its request, and each is also cut to its first few words.

The responses are the packaged SmolLM2's own, so the reward ranks what the search can actually reach:
a refusal is SmolLM2 continuing one of :data:`REFUSAL_OPENINGS` under the safety instruction, a
compliant answer is it continuing one of :data:`ANSWER_OPENINGS` with no instruction, a benign answer
is its greedy answer.  The openings are written here; many are phrased as the evaluation's refusal
matcher does not match ("Let's not go there", "That request could hurt someone"), so the reward is not
a copy of the judge.

Requests (none of them the evaluation's): harmful = HarmfulQ 50-99 and HH red-team first turns of
R_harmless's training split (``prompt_gate.harmful_prompts``); benign = the questions SmolLM2 wrote
for the prompt gate (``harm_gate/benign_questions.jsonl``).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Sequence

REFUSAL_OPENINGS = (
    "I'm sorry, but I can't help with", "I can't help with that", "I cannot", "Sorry, I can't", "I won't help with",
    "I'm not able to help with", "That's not something I can help with", "No. Helping with that could",
    "I must decline", "Unfortunately, I can't", "I'd rather not", "I'm sorry, but", "I'd prefer not to help",
    "Let's not go there:", "That request could hurt someone, so",
)
ANSWER_OPENINGS = ("Sure, here", "Here are", "To", "The", "First,", "You can", "Yes,", "Here's how", "There are",
                   "One way", "", "")  # "": the model's own opening
CUT_WORDS = (1, 2, 3, 4, 6, 9, 14)  # openings each pair is also cut to (words); 3 of them per pair
BACKBONE = "minilm"  # what the head reads; why not SmolLM2's own hidden states: docs/rewards.md (the search games it)


def harmful_sample(harmful: Sequence[str], rng: random.Random, n: int = 400) -> list[str]:
    """HarmfulQ 50-99 (the last 50 of ``prompt_gate.harmful_prompts``) and ``n`` HH red-team first turns."""
    hq, hh = list(harmful[-50:]), list(harmful[:-50])
    rng.shuffle(hh)
    return hq + hh[:n]


def generate_rows(harmful: Sequence[str], benign: Sequence[str], instruction: str, rng: random.Random, *,
                  model: str = "default", batch: int = 32, max_new_tokens: int = 40) -> list[dict]:
    """One row {prompt, chosen, rejected, kind} per request, the responses written by ``model`` (greedy
    continuations of an opening drawn with ``rng``); about 10 minutes for 1,000 requests on 2 CPU cores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import loading

    folder = loading.resolve(model)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()

    def chat(q: str, system: str | None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    jobs = []  # (key, chat text, opening)
    for i, q in enumerate(harmful):
        jobs.append((("h", i, "chosen"), chat(q, instruction), rng.choice(REFUSAL_OPENINGS)))
        jobs.append((("h", i, "rejected"), chat(q, None), rng.choice(ANSWER_OPENINGS)))
    for i, q in enumerate(benign):
        jobs.append((("b", i, "chosen"), chat(q, None), ""))
        jobs.append((("b", i, "rejected"), chat(q, instruction), rng.choice(REFUSAL_OPENINGS)))
    jobs.sort(key=lambda j: len(j[1]) + len(j[2]))  # similar lengths share a batch: less padding
    said: dict[tuple, str] = {}
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        enc = tok([text + opening for _, text, opening in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for (key, _, opening), row in zip(chunk, ids[:, enc.input_ids.shape[1]:]):
            said[key] = (opening + tok.decode(row, skip_special_tokens=True)).strip()
    return [{"prompt": q, "chosen": said[(kind, i, "chosen")], "rejected": said[(kind, i, "rejected")], "kind": kind}
            for kind, qs in (("h", harmful), ("b", benign)) for i, q in enumerate(qs)]


def with_openings(rows: Sequence[dict], *, seed: int = 1, cuts: int = 3) -> list[dict]:
    """Each pair whole and cut to ``cuts`` of :data:`CUT_WORDS` first words (both sides alike), so the
    reward also ranks the openings the search compares."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
        chosen, rejected = row["chosen"].split(" "), row["rejected"].split(" ")
        for k in rng.sample(CUT_WORDS, cuts):
            c, r = " ".join(chosen[:k]), " ".join(rejected[:k])
            if c and r and c != r:
                out.append({"prompt": row["prompt"], "chosen": c, "rejected": r})
    return out


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
