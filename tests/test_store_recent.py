import pytest

from data.store import AnnotationError, AnnotationStore, Judgement


def test_recent_labels_change_and_closed_rounds(tmp_path):
    store = AnnotationStore(f"sqlite:///{tmp_path / 'a.db'}")
    store.add_user("ann", password="pw-ann-pw")
    store.add_user("other", password="pw-other-pw")
    store.queue(1, [{"id": f"t{i}", "prompt": f"Question {i}?", "response_a": f"A{i}", "response_b": f"B{i}"} for i in range(12)])
    ids = []
    for i in range(11):
        t = store.next_task("ann")
        ids.append(store.submit(t.token, "ann", Judgement(chosen="A", strength="better", safe_a=True, safe_b=True)).label_id)
    recent = store.recent_labels("ann")
    assert [r.label_id for r in recent] == ids[::-1][:10]  # the last 10, newest first
    assert recent[0].prompt.startswith("Question") and all(r.changeable for r in recent)
    view, j = store.label_task("ann", ids[3])
    assert j == Judgement(chosen="A", strength="better", safe_a=True, safe_b=True, both_bad=False, comment=None)
    res = store.change_label("ann", ids[3], Judgement(chosen="B", strength="slightly_better", safe_a=True, safe_b=False,
                                                      both_bad=False, comment="changed my mind"))
    assert res.label_id == ids[3] and not res.duplicate
    [rec] = [r for r in store.label_records() if r.label_id == ids[3]]
    assert (rec.chosen, rec.strength, rec.safe_b, rec.comment) == ("B", "slightly_better", False, "changed my mind")
    assert len(store.label_records()) == 11  # changed in place, not added
    with pytest.raises(AnnotationError, match="not one of 'other'"):
        store.change_label("other", ids[3], Judgement(chosen="A", strength="better", safe_a=True, safe_b=True))
    with pytest.raises(AnnotationError, match="not one of 'other'"):
        store.label_task("other", ids[3])
    t = store.next_task("ann")  # leased before the round closes
    store.close_round(1)
    assert store.closed_rounds() == {1} and not any(r.changeable for r in store.recent_labels("ann"))
    assert store.next_task("ann") is None and store.next_task("other") is None  # a closed round's tasks leave the queue
    with pytest.raises(AnnotationError, match="round 1 is closed"):
        store.change_label("ann", ids[4], Judgement(chosen="B", strength="better", safe_a=True, safe_b=True))
    with pytest.raises(AnnotationError, match="round 1 is closed"):
        store.undo_last("ann")
    with pytest.raises(AnnotationError, match="round 1 is closed"):  # the lease taken before closing
        store.submit(t.token, "ann", Judgement(chosen="A", strength="better", safe_a=True, safe_b=True))
    store.reopen_round(1)
    assert store.closed_rounds() == set()
    store.change_label("ann", ids[4], Judgement(chosen="B", strength="better", safe_a=True, safe_b=True))
    with pytest.raises(AnnotationError, match="round 7 has no tasks"):
        store.close_round(7)


def test_close_and_reopen_a_round_from_the_cli(tmp_path):
    from tests.conftest import run_align

    db = f"sqlite:///{tmp_path / 'a.db'}"
    store = AnnotationStore(db)
    store.queue(2, [{"id": "t", "prompt": "Q?", "response_a": "a", "response_b": "b"}])
    res = run_align("annotate", "close-round", "--round", "2", "--db", db)
    assert res.returncode == 0 and "round 2 closed" in res.stdout, res.stderr
    assert store.closed_rounds() == {2}
    assert run_align("annotate", "reopen-round", "--round", "2", "--db", db).returncode == 0
    assert store.closed_rounds() == set()
    res = run_align("annotate", "close-round", "--round", "5", "--db", db)
    assert res.returncode == 2 and "round 5 has no tasks" in res.stderr
