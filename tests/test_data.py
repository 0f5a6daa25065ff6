"""Data layer: schemas, loaders for each format, error locations, templates, mixtures, splits."""

from __future__ import annotations

import gzip
import json

import pytest

from data.errors import DataError
from data.formats import detect_format, split_hh_pair
from data.loaders import DataSource, load_comparisons, load_prompts, load_sft, load_truthfulness, read_rows, write_jsonl
from data.mixing import mix, mix_proportions, split, stable_unit
from data.schemas import Comparison, SafetyBin, Strength
from data.templates import FAMILIES, expand_self_instruct, render

from conftest import write_jsonl as write


def cmp_row(**kw):
    row = {"prompt": "How do I boil an egg?", "response_a": "Put it in boiling water for 9 minutes.",
           "response_b": "Eggs are laid by hens.", "chosen": "A", "strength": "better", "safe_a": True, "safe_b": True}
    row.update(kw)
    return row


# -- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("significantly better", Strength.SIGNIFICANTLY_BETTER),
    ("Better", Strength.BETTER),
    ("slightly-better", Strength.SLIGHTLY_BETTER),
    ("Negligibly better / unsure", Strength.NEGLIGIBLY_BETTER),
    ("unsure", Strength.NEGLIGIBLY_BETTER),
    ("negligibly_better", Strength.NEGLIGIBLY_BETTER),
])
def test_strength_words(text, expected):
    assert Strength.parse(text) is expected


def test_unknown_strength_is_rejected_with_valid_words():
    with pytest.raises(DataError) as err:
        Strength.parse("way better")
    assert "way better" in str(err.value) and "significantly_better" in str(err.value)


@pytest.mark.parametrize("chosen,safe_a,safe_b,expected", [
    ("A", True, False, SafetyBin.CHOSEN_SAFE_OTHER_UNSAFE),
    ("B", False, True, SafetyBin.CHOSEN_SAFE_OTHER_UNSAFE),
    ("A", True, True, SafetyBin.BOTH_SAFE),
    ("B", False, False, SafetyBin.BOTH_UNSAFE),
    ("A", False, True, SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE),
])
def test_safety_bins(chosen, safe_a, safe_b, expected):
    c = Comparison.from_dict(cmp_row(chosen=chosen, safe_a=safe_a, safe_b=safe_b))
    assert c.safety_bin is expected


def test_comparison_resolves_chosen_and_round_trips():
    c = Comparison.from_dict(cmp_row(chosen="b", source_a={"model": "sft", "temperature": 0.7}, extra_field=3))
    assert c.chosen == "B"
    assert c.chosen_response == "Eggs are laid by hens."
    assert c.rejected_response.startswith("Put it")
    assert c.prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    assert c.meta == {"extra_field": 3}
    assert Comparison.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("change,key", [
    ({"chosen": None}, "chosen"),
    ({"chosen": "C"}, "chosen"),
    ({"response_b": "Put it in boiling water for 9 minutes."}, "response_b"),
    ({"response_a": "   "}, "response_a"),
    ({"strength": "massively"}, "strength"),
    ({"safe_a": "perhaps"}, "safe_a"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "prompt"),
    ({"round": "one"}, "round"),
])
def test_comparison_validation_names_the_key(change, key):
    with pytest.raises(DataError) as err:
        Comparison.from_dict(cmp_row(**change))
    assert err.value.key == key


# -- file loading and error locations ------------------------------------------------------------


def test_malformed_line_7_names_file_and_line(tmp_path):
    path = tmp_path / "cmp.jsonl"
    lines = [json.dumps(cmp_row(prompt=f"question {i}?")) for i in range(10)]
    lines[6] = '{"prompt": "broken", "response_a": '  # line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_comparisons(str(path))
    assert err.value.path == str(path) and err.value.line == 7
    assert f"{path}:7" in str(err.value)


@pytest.mark.parametrize("row,key", [
    ({"prompt": "q?", "response_a": "x", "response_b": "y"}, "chosen"),  # missing chosen
    ({"prompt": "q?", "response_a": "x", "response_b": "y", "chosen": "A", "strength": "hugely"}, "strength"),
    ({"prompt": "q?", "response_a": "same", "response_b": "same", "chosen": "A"}, "response_b"),
])
def test_bad_comparison_records_fail_with_file_line_key(tmp_path, row, key):
    rows = [cmp_row(prompt=f"q{i}?") for i in range(3)] + [row]
    path = write(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_comparisons(str(path))
    assert err.value.line == 4 and err.value.key == key


def test_empty_and_wrong_type_in_sft(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError) as err:
        load_sft(str(path))
    assert err.value.line == 1 and err.value.key == "messages[1].content" and "empty" in str(err.value)
    path = write(tmp_path / "t.jsonl", [{"messages": "hello"}])
    with pytest.raises(DataError) as err:
        load_sft(str(path))
    assert err.value.key == "messages"


def test_csv_missing_column_and_row_lines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nSay hi,,Hi!\nAdd 2 and 3,,5\nbroken,row\n")
    with pytest.raises(DataError) as err:
        load_sft(str(path))
    assert err.value.line == 4 and "fewer columns" in str(err.value)
    path.write_text("instruction,input\nSay hi,\n")
    with pytest.raises(DataError) as err:
        load_sft(DataSource(path=str(path), format="alpaca"))
    assert err.value.key == "output"


def test_formats_json_csv_parquet_gz(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "a.csv", "w") as fh:
        fh.write("instruction,input,output\n" + "\n".join(f"{r['instruction']},{r['input']},{r['output']}" for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a.json", "a.csv", "a.parquet", "a.jsonl.gz"):
        ex = load_sft(str(tmp_path / name))
        assert [m["content"] for m in ex[1].messages] == ["Translate to French.\n\ncat", "chat"], name
        assert ex[0].messages[0]["content"] == "Name a colour."


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        list(read_rows(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("x") else [])
    with pytest.raises(DataError, match="file not found"):
        load_sft(str(tmp_path / "nope.jsonl"))


# -- public formats --------------------------------------------------------------------------------


def test_hh_pair_prompt_is_the_shared_prefix():
    chosen = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\n"
              "Assistant: Why did the chicken cross the road?")
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."
    prompt, c, r = split_hh_pair(chosen, rejected)
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke"}]
    assert c == "Why did the chicken cross the road?" and r == "No."


def test_hh_pair_whose_responses_share_a_prefix():
    # the responses start alike: the prompt must still end at the last Assistant marker
    chosen = "\n\nHuman: Capital of France?\n\nAssistant: The capital is Paris."
    rejected = "\n\nHuman: Capital of France?\n\nAssistant: The capital is Lyon."
    prompt, c, r = split_hh_pair(chosen, rejected)
    assert prompt == [{"role": "user", "content": "Capital of France?"}]
    assert (c, r) == ("The capital is Paris.", "The capital is Lyon.")


def test_pku_trl_alpaca_detection_and_conversion(tmp_path):
    pku = {"prompt": "How to pick a lock?", "response_0": "Use a tension wrench...", "response_1": "I can't help with that.",
           "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
    trl = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}], "margin": 1.0}
    assert detect_format(pku) == "pku-saferlhf" and detect_format(trl) == "trl-preference"
    path = write(tmp_path / "p.jsonl", [pku])
    c = load_comparisons(str(path))[0]
    assert c.chosen_response.startswith("Use a tension") and c.safety_bin is SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE
    assert c.category == "safety"
    c = load_comparisons(str(write(tmp_path / "t.jsonl", [trl])))[0]
    assert (c.chosen_response, c.rejected_response, c.meta["margin"]) == ("4", "5", 1.0)
    prompts = load_prompts(str(path))
    assert prompts[0].text == "How to pick a lock?" and prompts[0].category == "safety"


def test_source_category_applies_to_rows_without_one(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "a?"}, {"prompt": "b?", "category": "helpfulness"}])
    prompts = load_prompts(DataSource(path=str(path), category="safety"))
    assert [p.category for p in prompts] == ["safety", "helpfulness"]


def test_hub_source_fails_clearly_offline():
    with pytest.raises(DataError) as err:
        load_comparisons("hub:Anthropic/definitely-not-a-real-dataset-xyz")
    assert "hub:Anthropic/definitely-not-a-real-dataset-xyz" in str(err.value)


def test_real_hh_rlhf_parses(shared_data):
    cmps = load_comparisons(str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"))
    assert len(cmps) > 2300  # 2,354 rows minus a few degenerate pairs
    for c in cmps[:200]:
        assert c.prompt[-1]["role"] == "user" and c.chosen_response != c.rejected_response


def test_real_truthfulqa_mc_and_self_instruct(shared_data):
    items = load_truthfulness(str(shared_data / "truthfulqa/mc_task.json"))
    assert len(items) == 817 and all(next(iter(i.mc1_targets.values())) == 1 for i in items)
    ex = load_sft(str(shared_data / "instruct/self_instruct_seed_tasks.jsonl"))
    assert len(ex) >= 175


# -- templates, mixtures, splits -----------------------------------------------------------------


def test_templates_are_deterministic_and_varied():
    rows = [{"question": f"What is {i} squared?", "answer": str(i * i)} for i in range(40)]
    first = [render(r, "qa")[0].messages[0]["content"] for r in rows]
    again = [render(r, "qa")[0].messages[0]["content"] for r in rows]
    assert first == again
    used = {next(t for t in FAMILIES["qa"].templates if t.format(question=r["question"]) == f) for r, f in zip(rows, first)}
    assert len(used) >= 3  # several phrasings across the dataset
    three = render(rows[0], "qa", templates_per_example=3)
    assert len({e.messages[0]["content"] for e in three}) == 3
    assert all(e.messages[1]["content"] == "0" for e in three)


def test_instruction_template_without_input_uses_short_templates():
    ex = render({"instruction": "Name a prime.", "input": "", "output": "7"}, "instruction")[0]
    assert ex.messages[0]["content"] in [t.format(instruction="Name a prime.") for t in FAMILIES["instruction"].short_templates]


def test_self_instruct_expansion_and_missing_field():
    row = {"id": "t1", "instruction": "Add the numbers.",
           "instances": [{"input": "1, 2", "output": "3"}, {"input": "4, 5", "output": "9"}]}
    ex = expand_self_instruct(row)
    assert [e.messages[1]["content"] for e in ex] == ["3", "9"]
    with pytest.raises(DataError) as err:
        expand_self_instruct({"instruction": "x", "instances": [{"input": "a"}]})
    assert err.value.key == "instances[0].output"


def test_task_format_with_template_family(tmp_path):
    path = write(tmp_path / "sum.jsonl", [{"text": "Long text about cats.", "summary": "Cats."}])
    ex = load_sft(DataSource(path=str(path), format="task", template="summarization"))
    assert "Long text about cats." in ex[0].messages[0]["content"] and ex[0].messages[1]["content"] == "Cats."


def test_mix_weights():
    a, b = list(range(10)), list(range(100, 120))
    out = mix([(a, 2.0), (b, 0.5)], seed=1)
    assert len(out) == 2 * 10 + 10
    assert sorted(x for x in out if x < 100) == sorted(a * 2)
    assert len(set(x for x in out if x >= 100)) == 10
    assert mix([(a, 2.0), (b, 0.5)], seed=1) == out


def test_mix_proportions_90_10():
    safety, helpful = [("s", i) for i in range(90)], [("h", i) for i in range(500)]
    out = mix_proportions([(safety, 0.9), (helpful, 0.1)], seed=0)
    assert len(out) == 100
    assert sum(1 for k, _ in out if k == "s") == 90 and sum(1 for k, _ in out if k == "h") == 10


def test_split_is_deterministic_order_free_and_keeps_duplicates_together():
    recs = [Comparison.from_dict(cmp_row(prompt=f"question {i % 50}?", response_a=f"a{i}")) for i in range(200)]
    train, val, test = split(recs, 0.2, 0.1, seed=3)
    assert len(train) + len(val) + len(test) == 200
    train2, val2, _ = split(list(reversed(recs)), 0.2, 0.1, seed=3)
    assert sorted(r.response_a for r in val) == sorted(r.response_a for r in val2)
    val_prompts = {r.prompt_text for r in val}
    assert not val_prompts & {r.prompt_text for r in train}
    assert 0.1 < len(val) / 200 < 0.3


def test_split_never_leaves_an_asked_for_validation_share_empty():
    """24 prompts at 0.125 hashed none into validation (the demo's rejection sampling failed on it): the
    record nearest the band moves there, with its duplicates."""
    recs = [Comparison.from_dict(cmp_row(prompt=f"q{i}?", response_a=f"a{i}")) for i in range(24)]
    seed = next(s for s in range(500) if all(stable_unit(_plain_key(r), s) >= 0.125 for r in recs))  # hash alone: none held out
    dup = Comparison.from_dict(cmp_row(prompt=min(recs, key=lambda r: stable_unit(_plain_key(r), seed)).prompt_text,
                                       response_a="dup"))
    assert split(recs, 0.125, seed=seed, key=_plain_key)[1] == []  # by default the hash alone decides
    train, val, _ = split([*recs, dup], 0.125, seed=seed, key=_plain_key, at_least_one_val=True)
    assert len(val) == 2 and {r.prompt_text for r in val} == {dup.prompt_text} and len(train) == 23
    assert split(recs, 0.0, seed=seed, key=_plain_key, at_least_one_val=True)[1] == []  # none asked for, none given
    one = [r for r in recs if stable_unit(_plain_key(r), seed) >= 0.5][:1]
    # a single record stays for training
    assert split(one, 0.5, seed=seed, key=_plain_key, at_least_one_val=True) == (one, [], [])


def _plain_key(r) -> str:
    return r.prompt_text


def test_write_jsonl_never_overwrites(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [{"a": 1}])
    with pytest.raises(FileExistsError):
        write_jsonl(path, [{"a": 2}])
    assert json.loads(path.read_text()) == {"a": 1}


def test_prompts_first_turn_only(tmp_path):
    """turns: first keeps each dialogue's first user turn (HH-RLHF's multi-turn transcripts become single questions);
    the reference answer answered a later turn, so it is dropped; repeated first turns are one prompt."""
    from conftest import write_jsonl

    from data.loaders import DataSource, load_prompts

    rows = [{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5"},
            {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hey.", "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
            {"chosen": "\n\nHuman: Name a colour\n\nAssistant: Red", "rejected": "\n\nHuman: Name a colour\n\nAssistant: No"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    whole = load_prompts(DataSource(path=str(path)))
    assert [len(p.messages) for p in whole] == [3, 1, 1]
    first = load_prompts(DataSource(path=str(path), turns="first"))
    assert [p.messages for p in first] == [[{"role": "user", "content": "Hi there"}],
                                           [{"role": "user", "content": "Name a colour"}]]
    assert first[0].reference is None and first[1].reference == "Red"
