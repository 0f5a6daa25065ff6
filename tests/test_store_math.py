"""The store's pure pieces, checked against values computed by hand: agreement statistics, the
majority policy, the overlap choice, task-file parsing, password hashes."""

from __future__ import annotations

import datetime as dt

import pytest

from data.errors import DataError
from data.store.agreement import cohen_kappa, coincidences, krippendorff_alpha, signed_preference
from data.store.export import LabelRecord, majority_vote, plan_export, weaker_median
from data.store.pairs import overlap_labels, parse_task
from data.store.passwords import hash_password, verify_password
from data.store.simulated import strength_from_gap


def test_cohen_kappa_by_hand():
    # p_o = 4/5; p_A = 3/5 and 2/5, p_B = 2/5 and 3/5: p_e = 6/25 + 6/25 = 12/25; (20/25 - 12/25) / (13/25) = 8/13
    assert cohen_kappa("AABBA", "ABBBA") == pytest.approx(8 / 13)
    assert cohen_kappa("ABAB", "ABAB") == 1.0
    assert cohen_kappa("AB", "BA") == pytest.approx(-1.0)  # p_o 0, p_e 1/2
    assert cohen_kappa("AAA", "AAA") is None  # p_e = 1: undefined
    assert cohen_kappa("", "") is None
    with pytest.raises(ValueError):
        cohen_kappa("AB", "A")


def test_coincidences_by_hand():
    o = coincidences([["A", "A", "B"], ["A", "B"], ["B"]])
    # unit 1 (m = 3): each ordered pair counts 1/2; unit 2 (m = 2): 1; unit 3 is not pairable
    assert o == {("A", "A"): 1.0, ("A", "B"): 2.0, ("B", "A"): 2.0}


KRIPPENDORFF_2011 = [  # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 coders x 12 units
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


@pytest.mark.parametrize("metric,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_the_published_example(metric, expected):
    units = [[v for v in col if v is not None] for col in zip(*KRIPPENDORFF_2011)]
    assert krippendorff_alpha(units, metric) == pytest.approx(expected, abs=5e-4)


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha([["A", "A"], ["B", "B"]]) == 1.0
    assert krippendorff_alpha([["A"], ["B"]]) is None  # nothing pairable
    assert krippendorff_alpha([["A", "A"], ["A", "A"]]) is None  # no variation: undefined
    with pytest.raises(ValueError, match="unknown metric"):
        krippendorff_alpha([[1, 2]], "ratio")  # type: ignore[arg-type]


def test_signed_preference():
    assert ([signed_preference("A", s) for s in ("significantly_better", "better", "slightly_better", "negligibly_better")]
            == [4, 3, 2, 1])
    assert signed_preference("B", "significantly_better") == -4 and signed_preference("B", None) == -3


def test_weaker_median_and_majority_vote():
    assert weaker_median(["significantly_better", "slightly_better"]) == "slightly_better"
    assert weaker_median(["better", "significantly_better", "negligibly_better"]) == "better"
    assert weaker_median([None, "better"]) == "better" and weaker_median([None]) is None
    assert majority_vote([True, True, False]) is True
    assert majority_vote([True, False]) is False  # a tie counts as unsafe
    assert majority_vote([None, None]) is None and majority_vote([None, True]) is True


def record(task: int, annotator: str, chosen: str, strength: str | None = "better", **kw) -> LabelRecord:
    base = {"label_id": hash((task, annotator)) % 10_000, "task_id": task, "task_uid": f"t{task}", "round": 3,
            "prompt": [{"role": "user", "content": f"q{task}"}], "response_a": f"a{task}", "response_b": f"b{task}",
            "source_a": None, "source_b": None, "category": "helpfulness", "labels_needed": 3, "labels_done": 3,
            "annotator": annotator, "annotator_kind": "human", "chosen": chosen, "strength": strength, "safe_a": True,
            "safe_b": True, "both_bad": False, "comment": None, "swapped": False, "seconds": 12.0,
            "created_at": dt.datetime(2026, 11, 22, tzinfo=dt.UTC)}
    base.update(kw)
    return LabelRecord(**base)


def test_plan_export_policies():
    recs = [record(1, "x", "B", "better"), record(1, "y", "B", "significantly_better"), record(1, "z", "A", "slightly_better"),
            record(2, "x", "A", labels_needed=2), record(2, "y", "B", labels_needed=2),
            record(3, "x", "A", labels_needed=3, labels_done=1, both_bad=True)]
    maj = plan_export(recs)
    assert [c.id for c in maj.comparisons] == ["r3-t1", "r3-t3"] and maj.ties_dropped == 1 and maj.tasks == 3
    t1 = maj.comparisons[0]
    assert (t1.chosen, t1.strength.value, t1.meta["agreement"]) == ("B", "better", pytest.approx(2 / 3, abs=1e-4))
    assert plan_export(recs, complete_only=True).incomplete_skipped == 1
    assert len(plan_export(recs, policy="all").comparisons) == 6
    dropped = plan_export(recs, policy="all", drop_both_bad=True)
    assert len(dropped.comparisons) == 5 and dropped.both_bad_dropped == 1
    swapped = plan_export([record(4, "x", "A", swapped=True)], policy="all").comparisons[0]
    assert swapped.chosen == "A" and swapped.meta["shown_left"] == "B"  # stored in true identities
    with pytest.raises(ValueError, match="unknown export policy"):
        plan_export(recs, policy="best")  # type: ignore[arg-type]


def test_weighted_policy_breaks_even_splits_by_strength_and_comments_carry_the_screen_order():
    """Two labels per overlap task split 1-1: majority drops them as ties; weighted keeps the stronger side."""
    recs = [record(1, "x", "A", "slightly_better", labels_needed=2), record(1, "y", "B", "significantly_better", labels_needed=2),
            record(2, "x", "A", "better", labels_needed=2), record(2, "y", "B", "better", labels_needed=2),
            record(3, "x", "B", None, labels_needed=2, comment="A is clearly more on topic", swapped=True),
            record(3, "y", "B", "better", labels_needed=2)]
    assert [c.id for c in plan_export(recs).comparisons] == ["r3-t3"] and plan_export(recs).ties_dropped == 2
    w = plan_export(recs, policy="weighted")
    assert [c.id for c in w.comparisons] == ["r3-t1", "r3-t3"] and w.ties_dropped == 1  # 4 vs 2 wins; 3 vs 3 stays a tie
    t1 = w.comparisons[0]
    assert t1.chosen == "B" and t1.strength.value == "significantly_better" and t1.meta["tie_broken_by_strength"]
    # x saw the true B on the left and wrote "A": the export says which response that was
    assert w.comparisons[1].meta["comments"] == ["x (screen A = response_b, screen B = response_a): A is clearly more on topic"]
    every = {c.annotator: c for c in plan_export(recs, policy="all").comparisons if c.id.startswith("r3-t3")}
    assert every["x"].meta["comment_positions"] == "screen A = response_b, screen B = response_a"
    assert "comment_positions" not in every["y"].meta


def test_overlap_choice_is_exact_stable_and_order_free():
    uids = [f"u{i}" for i in range(50)]
    a = overlap_labels(uids, labels=1, overlap=0.1, overlap_labels=3)
    assert sorted(a.values()).count(3) == 5 and sorted(a.values()).count(1) == 45
    assert overlap_labels(list(reversed(uids)), labels=1, overlap=0.1, overlap_labels=3) == a
    assert overlap_labels(uids, overlap=0.1, seed=1) != a
    assert set(overlap_labels(uids, labels=2).values()) == {2}
    with pytest.raises(ValueError, match="overlap must be in"):
        overlap_labels(uids, overlap=1.5)


def test_parse_task_accepts_strings_and_conversations():
    t = parse_task({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "joke?"}],
                    "response_a": "x", "response_b": "y", "source_a": "sft", "origin": "hh"})
    assert t.uid.startswith("t-") and len(t.prompt) == 3 and t.source_a == {"model": "sft"} and t.meta == {"origin": "hh"}
    same = {"prompt": "p", "response_a": "x", "response_b": "y"}
    assert parse_task(same).uid == parse_task(dict(same)).uid != parse_task({**same, "response_b": "z"}).uid  # a content hash
    assert parse_task({**same, "id": 7}).uid == "7"
    for row, key in [({"response_a": "x", "response_b": "y"}, "prompt"), ({"prompt": "p", "response_b": "y"}, "response_a"),
                     ({"prompt": "p", "response_a": "x", "response_b": "y", "labels": 0}, "labels"),
                     ({"prompt": "p", "response_a": "x", "response_b": "y", "meta": [1]}, "meta")]:
        with pytest.raises(DataError) as err:
            parse_task(row)
        assert err.value.key == key


def test_password_hashes_are_salted_and_verified():
    h1, h2 = hash_password("s3cret pass", n=2**10), hash_password("s3cret pass", n=2**10)
    assert h1 != h2 and h1.startswith("scrypt$1024$8$1$")
    assert verify_password("s3cret pass", h1) and not verify_password("s3cret pasS", h1)
    assert not verify_password("x", "not-a-hash") and not verify_password("x", "bcrypt$1$2$3$4$5")
    with pytest.raises(ValueError):
        hash_password("")


def test_strength_from_gap():
    assert [strength_from_gap(g) for g in (0.0, 0.24, -0.3, 0.75, -1.0, 5)] == [
        "negligibly_better", "negligibly_better", "slightly_better", "better", "significantly_better", "significantly_better"]


def test_the_label_fields_are_declared_once():
    """Judgement declares the label's fields; the table, the label records and the export follow it."""
    import dataclasses

    from data.schemas import Comparison
    from data.store.export import LabelRecord, label_comparison
    from data.store.label import JUDGEMENT_FIELDS, META_FIELDS, Judgement
    from data.store.tables import Label

    assert JUDGEMENT_FIELDS == ("chosen", "strength", "safe_a", "safe_b", "both_bad", "comment")
    assert set(JUDGEMENT_FIELDS) <= set(Label.__table__.columns.keys())  # a column per field
    assert set(JUDGEMENT_FIELDS) <= {f.name for f in dataclasses.fields(LabelRecord)}
    comparison = {f.name for f in dataclasses.fields(Comparison)}
    assert set(JUDGEMENT_FIELDS) == (set(JUDGEMENT_FIELDS) & comparison) | set(META_FIELDS)  # each has a place in the export
    j = Judgement(chosen="B", strength="better", safe_a=True, safe_b=None, both_bad=True, comment="both vague")
    assert Judgement.of(j) == j and j.columns()["comment"] == "both vague"
    rec = LabelRecord(**j.columns(), label_id=1, task_id=1, task_uid="t1", round=1, prompt=[{"role": "user", "content": "q"}],
                      response_a="a", response_b="b", source_a=None, source_b=None, category=None, labels_needed=1, labels_done=1,
                      annotator="ann", annotator_kind="human", swapped=False, seconds=None,
                      created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    c = label_comparison(rec)
    assert (c.chosen, c.strength.value, c.safe_a, c.safe_b) == ("B", "better", True, None)
    assert c.meta["both_bad"] is True and c.meta["comment"] == "both vague"
    assert "comment" not in label_comparison(dataclasses.replace(rec, comment=None)).meta


def test_majority_export_keeps_a_new_label_field(monkeypatch):
    """A field added to META_FIELDS reaches the majority export's meta (it used to name every field itself)."""
    import data.store.export as export

    monkeypatch.setattr(export, "META_FIELDS", (*export.META_FIELDS, "seconds"))  # stand-in for a new label field
    recs = [record(1, "x", "A", seconds=5.0), record(1, "y", "A", seconds=None), record(1, "z", "B", seconds=9.0)]
    (c,) = plan_export(recs).comparisons
    assert c.meta["seconds"] == {"x": 5.0, "z": 9.0}
