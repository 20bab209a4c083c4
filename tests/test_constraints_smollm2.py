"""SmolLM2 under a JSON schema: five prompts, five schema-valid answers (marker ``integration``)."""

from __future__ import annotations

import pytest

from dealign import Aligner
from dealign.evaluation.format import items, parse, schema_valid
from dealign.evaluation.tasks import FORMAT_DEAL
from dealign.rewards import keywords

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return Aligner.from_pretrained()


@pytest.mark.parametrize("strategy", ["greedy", "deal"])
def test_smollm2_returns_schema_valid_json_for_five_prompts(smollm2, strategy):
    search = {"strategy": "greedy"} if strategy == "greedy" else FORMAT_DEAL  # the eval's deal+mask settings
    for _, prompt, schema, words in items()[:5]:
        result = smollm2.generate(prompt, reward=keywords(words), json_schema=schema, max_new_tokens=128, **search)
        assert result.finished, result.text
        value = parse(result.text)
        assert value is not None and schema_valid(value, schema), result.text
