"""The embedded default model: the real SmolLM2-135M-Instruct, loaded offline."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_and_answers_coherently(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from foundation.generation import generate_texts
    from foundation.models import load_causal_lm, load_tokenizer, resolve

    resolved = resolve("smollm2-135m")
    assert resolved.path.endswith("smollm2-135m-instruct-v1")
    model, tok = load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) == 134_515_008
    answers = generate_texts(model, tok, ["What is the capital of France?", "Name three primary colors."], max_new_tokens=40)
    assert "Paris" in answers[0]
    assert sum(c in answers[1].lower() for c in ("red", "blue", "yellow", "green")) >= 2
