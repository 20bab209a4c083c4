"""The ``format`` task's items: prompts asking for a JSON object with given fields (written for this
project, not taken from a benchmark), each with its JSON schema and the words its ``summary`` field
should use (the content reward)."""

from __future__ import annotations

import json
from typing import Any

# (topic, extra fields name -> JSON type, keywords the summary should use)
TOPICS: list[tuple[str, dict[str, str], list[str]]] = [
    ("a dog playing in a park", {"breed": "string", "age_years": "integer"}, ["dog", "ball"]),
    ("a rainy afternoon in a city", {"city": "string", "temperature_c": "number"}, ["rain", "umbrella"]),
    ("a bakery that opened last week", {"name": "string", "open_on_sunday": "boolean"}, ["bread", "oven"]),
    ("a football match", {"home_team": "string", "goals": "integer"}, ["goal", "crowd"]),
    ("a mountain hike", {"mountain": "string", "height_m": "integer"}, ["trail", "summit"]),
    ("a birthday party", {"guest_of_honour": "string", "guests": "integer"}, ["cake", "candles"]),
    ("a new smartphone", {"brand": "string", "price_usd": "number"}, ["battery", "screen"]),
    ("a cat sleeping by a window", {"cat_name": "string", "indoor": "boolean"}, ["cat", "sun"]),
    ("a train journey", {"from_city": "string", "to_city": "string"}, ["train", "station"]),
    ("a school science fair", {"winner": "string", "projects": "integer"}, ["students", "experiment"]),
    ("a beach holiday", {"beach": "string", "days": "integer"}, ["sand", "waves"]),
    ("a library book sale", {"library": "string", "books_sold": "integer"}, ["books", "readers"]),
    ("a farmers market", {"town": "string", "stalls": "integer"}, ["vegetables", "farmers"]),
    ("a snowstorm", {"region": "string", "snow_cm": "number"}, ["snow", "roads"]),
    ("a jazz concert", {"band": "string", "sold_out": "boolean"}, ["music", "stage"]),
    ("a cooking class", {"dish": "string", "minutes": "integer"}, ["kitchen", "recipe"]),
    ("a bicycle race", {"winner": "string", "distance_km": "number"}, ["riders", "finish"]),
    ("a garden in spring", {"owner": "string", "flower_beds": "integer"}, ["flowers", "bees"]),
    ("a lost wallet returned", {"finder": "string", "reward_given": "boolean"}, ["wallet", "police"]),
    ("a museum exhibition", {"museum": "string", "paintings": "integer"}, ["art", "visitors"]),
    ("a job interview", {"company": "string", "hired": "boolean"}, ["interview", "questions"]),
    ("a chess tournament", {"champion": "string", "rounds": "integer"}, ["chess", "players"]),
    ("a hospital volunteer day", {"hospital": "string", "volunteers": "integer"}, ["patients", "nurses"]),
    ("a fishing trip on a lake", {"lake": "string", "fish_caught": "integer"}, ["boat", "fish"]),
    ("a power outage", {"neighbourhood": "string", "hours": "number"}, ["lights", "candles"]),
    ("a coffee shop", {"name": "string", "has_wifi": "boolean"}, ["coffee", "customers"]),
    ("a school bus trip to a zoo", {"zoo": "string", "children": "integer"}, ["animals", "bus"]),
    ("a house move", {"new_town": "string", "boxes": "integer"}, ["boxes", "truck"]),
    ("a film premiere", {"film": "string", "runtime_min": "integer"}, ["actors", "cinema"]),
    ("a marathon", {"city": "string", "runners": "integer"}, ["runners", "water"]),
    ("a camping night", {"campsite": "string", "tents": "integer"}, ["fire", "stars"]),
    ("a robot vacuum cleaner review", {"model": "string", "stars": "integer"}, ["floor", "dust"]),
]


def schema_for(extra: dict[str, str]) -> dict[str, Any]:
    """An object with a short ``summary`` string, the topic's own fields, nothing else."""
    props: dict[str, Any] = {"summary": {"type": "string", "maxLength": 160}}
    for name, kind in extra.items():
        props[name] = {"type": kind, **({"maxLength": 40} if kind == "string" else {})}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def prompt_for(topic: str, extra: dict[str, str], words: list[str]) -> str:
    fields = ", ".join(f'"{k}" ({v})' for k, v in {"summary": "string", **extra}.items())
    return (f"Describe {topic} as a JSON object with exactly these fields: {fields}. The summary is one short "
            f"sentence that uses the words {' and '.join(words)}. Reply with the JSON object only.")


def items() -> list[tuple[str, str, dict[str, Any], list[str]]]:
    """``(id, prompt, schema, keywords)`` for every topic."""
    return [(f"format-{i:02d}", prompt_for(t, extra, kw), schema_for(extra), kw)
            for i, (t, extra, kw) in enumerate(TOPICS)]


def parse(text: str) -> Any:
    """The answer as JSON, or None if it does not parse (the whole text must be one JSON value)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def schema_valid(value: Any, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def string_fields(value: Any) -> str:
    """The text of a parsed answer's string fields (what a reader reads), joined."""
    if isinstance(value, dict):
        return " ".join(v for v in value.values() if isinstance(v, str))
    return ""
