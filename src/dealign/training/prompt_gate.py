"""The prompt gate: P(a request is harmful | its text), a logistic head on MiniLM embeddings.

Why: neither packaged reward reads the request.  R_harmless scores a refusal 0.78 above a real answer
on harmful requests and 0.87 above it on benign ones; R_helpful the reverse (-0.86 / -0.89) -- so no
weighting of the two refuses the first and answers the second.  The gate supplies what they lack:
``harm_gated`` (rewards/gated.py) scores an answer by R_harmless where the request looks harmful and
by R_helpful where it does not.  It weights rewards; it never forces an answer.

Data (none of it the evaluation's): harmful = first user turns of the HH-RLHF red-team dialogues in
R_harmless's *training* split plus HarmfulQ questions 50-99; benign = ordinary questions SmolLM2
wrote when asked for a question about each of :data:`TOPICS` (sampled; ``benign_gen.jsonl``, built
by ``generate_benign``).  Chosen on: HarmfulQ 100-119 and the benign dev split.  Reported on: the
written harmful requests and the benign test split (``dealign eval harmless``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

TOPICS = (
    "baking bread", "cooking pasta", "making coffee", "growing tomatoes", "houseplants", "composting", "birds",
    "dogs", "cats", "aquarium fish", "the solar system", "volcanoes", "earthquakes", "the weather", "climate",
    "the ocean", "dinosaurs", "ancient Rome", "ancient Egypt", "the Middle Ages", "World War I history",
    "the Renaissance", "the Industrial Revolution", "world geography", "learning Spanish", "grammar",
    "writing essays", "poetry", "novels", "classical music", "playing guitar", "learning piano", "painting",
    "drawing", "photography", "filmmaking", "video games", "board games", "chess strategy", "football",
    "basketball", "tennis", "running", "swimming", "yoga", "weight training", "nutrition", "sleep",
    "headaches", "colds and flu", "first aid", "dental care", "skin care", "hair care", "fashion", "knitting",
    "woodworking", "home repair", "plumbing", "painting a room", "cleaning the house", "laundry", "moving house",
    "renting an apartment", "buying a car", "car maintenance", "cycling", "public transport", "travel planning",
    "packing for a trip", "camping", "hiking", "fishing", "budgeting", "saving for retirement", "taxes",
    "credit cards", "job interviews", "writing a resume", "starting a business", "marketing", "public speaking",
    "time management", "studying for exams", "math homework", "physics", "chemistry", "biology", "computers",
    "Python programming", "spreadsheets", "smartphones", "the internet", "email etiquette", "friendship",
    "parenting toddlers", "teenagers", "weddings", "birthday parties", "gift ideas", "holidays", "meditation",
    "philosophy", "economics", "elections", "recycling", "electric cars", "space exploration", "museums",
)

# the last three in the words harmful requests start with too, so the gate learns topics, not phrasing
STYLES = ("a how-to question", "a why question", "a what question", "a question asking for advice",
          "a question that starts with 'How do I'", "a question that starts with 'How can I'",
          "a question that starts with 'What is the best way to'")
GATE_FILE = "gate.json"


def generate_benign(out: Path, *, seed: int = 0, batch: int = 16) -> list[str]:
    """Ordinary questions written by the packaged SmolLM2 (one per topic and style, sampled at T=0.8),
    saved one JSON object per line to ``out``; about 3 minutes on 2 CPU cores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import loading

    folder = loading.resolve("default")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    asks = [(t, tok.apply_chat_template([{"role": "user", "content": f"Write {s} that a person might ask an assistant "
                                          f"about {t}. Reply with the question only."}], tokenize=False,
                                        add_generation_prompt=True)) for t in TOPICS for s in STYLES]
    questions = []
    for i in range(0, len(asks), batch):
        chunk = asks[i : i + batch]
        enc = tok([p for _, p in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=32, do_sample=True, temperature=0.8, top_p=0.95,
                                 pad_token_id=tok.pad_token_id)
        questions += [tok.decode(row, skip_special_tokens=True).strip() for row in ids[:, enc.input_ids.shape[1]:]]
    questions = clean_questions(questions)
    out.write_text("".join(json.dumps({"q": q}) + "\n" for q in questions), encoding="utf-8")
    return questions


def read_questions(path: Path) -> list[str]:
    """The questions of a file ``generate_benign`` wrote (one JSON object {"q": ...} per line)."""
    return [json.loads(line)["q"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def clean_questions(texts: Sequence[str]) -> list[str]:
    """One question per generation: a quoted question if there is one, else the first sentence ending in
    '?'; generations without a question are dropped, repeats kept once."""
    seen, out = set(), []
    for t in texts:
        quoted = re.findall(r'"([^"]{10,200}\?)"', t)
        plain = re.findall(r"(?:^|(?<=[.!:\n]))\s*([A-Z][^.!?\n\"]{8,200}\?)", t)
        line = (quoted or plain or [""])[0].strip()
        if 10 <= len(line) <= 200 and line.lower() not in seen:
            seen.add(line.lower())
            out.append(line)
    return out


def harmful_prompts(data: Path) -> list[str]:
    """Red-team first turns of R_harmless's training split (re-split as it was trained) and HarmfulQ 50-99."""
    from ..rewards.learned import load_reward_folder
    from ..rewards.registry import WEIGHTS_DIR
    from .data import trained_split

    train, _ = trained_split(load_reward_folder(WEIGHTS_DIR / "harmless").config["split"], data)
    hh = list(dict.fromkeys(p.opening for p in train if p.opening))
    hq = json.loads((data / "harmfulq" / "harmfulq.json").read_text(encoding="utf-8"))[50:100]
    return hh + [str(q) for q in hq]


def fit_gate(harmful: Sequence[str], benign: Sequence[str], *, l2: float = 1e-3, steps: int = 200):
    """A class-balanced logistic regression on MiniLM embeddings; returns (weights [dim], bias)."""
    import torch

    from ..rewards.embedding import embedder

    x = embedder().encode(list(harmful) + list(benign))
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    pos_w = len(benign) / max(len(harmful), 1)  # balance the classes
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, weight=torch.where(y > 0, pos_w, 1.0)) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def dev_accuracy(gate, harmful: Sequence[str], benign: Sequence[str]) -> dict:
    """Share of ``harmful`` the gate calls harmful (P >= 0.5) and of ``benign`` it calls benign."""
    ph, pb = gate(list(harmful)), gate(list(benign))
    return {"harmful_flagged": sum(p >= 0.5 for p in ph) / max(len(ph), 1),
            "benign_passed": sum(p < 0.5 for p in pb) / max(len(pb), 1), "n_harmful": len(ph), "n_benign": len(pb)}


def save_gate(out: Path, w, b: float, info: dict) -> Path:
    """``out/gate.json``: the head (weights over MiniLM's normalised embedding, bias) and how it was made."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / GATE_FILE
    path.write_text(json.dumps({"embedder": "all-MiniLM-L6-v2", "bias": b, "weights": [round(float(v), 6) for v in w],
                                **info}, indent=1), encoding="utf-8")
    return path
