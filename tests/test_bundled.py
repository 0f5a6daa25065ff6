"""The datasets shipped in data/bundled: valid, big enough, varied, covering the Llama 2 labels,
documented, and not copied from the public datasets."""

from __future__ import annotations

import collections
import csv
import gzip
import json


from data.loaders import BUNDLED_DIR, load_comparisons, load_prompts, load_sft, load_truthfulness
from data.schemas import SafetyBin, Strength


def _distinct_openings(texts: list[str], n_words: int = 4) -> float:
    openings = {" ".join(t.lower().split()[:n_words]) for t in texts}
    return len(openings) / len(texts)


def test_cards_exist_and_state_counts():
    for name in ("sft", "comparisons", "prompts", "truthfulness"):
        card = BUNDLED_DIR / f"{name}.md"
        assert card.is_file(), card
        n = sum(1 for line in (BUNDLED_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip())
        assert f"{n:,}" in card.read_text() or str(n) in card.read_text(), f"{card} does not state its {n} records"


def test_sft_dialogues():
    ex = load_sft("bundled:sft")
    assert len(ex) >= 200
    assert len({e.id for e in ex}) == len(ex)
    cats = collections.Counter(e.category for e in ex)
    assert {"helpful", "refusal", "borderline"} <= set(cats) and min(cats.values()) >= 20
    assert sum(1 for e in ex if sum(m["role"] == "user" for m in e.messages) > 1) >= 10  # multi-turn
    assert sum(1 for e in ex if e.messages[0]["role"] == "system") >= 5
    assert _distinct_openings([e.messages[0 if e.messages[0]["role"] != "system" else 1]["content"] for e in ex]) > 0.8


def test_comparisons_cover_strengths_and_safety_bins():
    cmps = load_comparisons("bundled:comparisons")
    assert len(cmps) >= 300
    strengths = collections.Counter(c.strength for c in cmps)
    assert all(strengths[s] >= 30 for s in Strength)
    bins = collections.Counter(c.safety_bin for c in cmps)
    for b in (SafetyBin.CHOSEN_SAFE_OTHER_UNSAFE, SafetyBin.BOTH_SAFE, SafetyBin.BOTH_UNSAFE):
        assert bins[b] >= 30, bins
    assert bins[SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE] >= 1  # the pairs the safety RM drops
    assert collections.Counter(c.category for c in cmps).keys() == {"helpfulness", "safety"}
    positions = collections.Counter(c.chosen for c in cmps)
    assert 0.35 < positions["A"] / len(cmps) < 0.65  # no position shortcut for a reward model
    assert _distinct_openings([c.prompt_text for c in cmps]) > 0.8


def test_prompts():
    prompts = load_prompts("bundled:prompts")
    assert len(prompts) >= 200
    cats = collections.Counter(p.category for p in prompts)
    assert cats["helpfulness"] >= 60 and cats["safety"] >= 60
    assert sum(1 for p in prompts if len(p.messages) > 1) >= 5
    assert _distinct_openings([p.text for p in prompts]) > 0.8
    sft_users = {m["content"].strip().lower() for e in load_sft("bundled:sft") for m in e.messages if m["role"] == "user"}
    assert not {p.text.strip().lower() for p in prompts} & sft_users  # sampling prompts are not training prompts


def test_truthfulness_items():
    items = load_truthfulness("bundled:truthfulness")
    assert len(items) >= 40
    assert len({i.question for i in items}) == len(items)
    assert len({i.category for i in items}) >= 5


def test_not_copied_from_public_datasets(shared_data):
    tqa = {row["Question"].strip().lower()
           for row in csv.DictReader(open(shared_data / "truthfulqa/TruthfulQA.csv", encoding="utf-8-sig"))}
    ours = {i.question.strip().lower() for i in load_truthfulness("bundled:truthfulness")}
    assert not ours & tqa
    hh_prompts = set()
    for part in ("helpful-base", "harmless-base"):
        with gzip.open(shared_data / f"hh-rlhf/{part}/test.jsonl.gz", "rt") as fh:
            for line in fh:
                first = json.loads(line)["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman:", "").strip().lower()
                hh_prompts.add(first)
    bundled_prompts = {c.prompt[0]["content"].strip().lower() for c in load_comparisons("bundled:comparisons")}
    bundled_prompts |= {p.messages[0]["content"].strip().lower() for p in load_prompts("bundled:prompts")}
    assert not bundled_prompts & hh_prompts
