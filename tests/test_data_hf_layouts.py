"""Evaluation data in the Hugging Face layouts users have (a copy of the Hub repository, or a
``save_to_disk`` folder), built here from the ../shared/data originals: TruthfulQA (``truthful_qa``,
configurations multiple_choice and generation), ToxiGen (``toxigen/toxigen-data``, configuration
train) and HH-RLHF (``Anthropic/hh-rlhf``, data_dir helpful-base)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest

from alignment.evals import toxigen, truthfulqa_data
from data.errors import DataError
from data.loaders import DataSource, load_comparisons, load_prompts, local_dataset_files


def _hf_targets(targets: dict) -> dict:
    return {"choices": list(targets), "labels": list(targets.values())}


@pytest.fixture(scope="module")
def truthful_qa_repo(shared_data, tmp_path_factory) -> Path:
    """``truthful_qa`` as its Hub repository holds it: <config>/validation-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hf") / "truthful_qa"
    mc = json.loads((shared_data / "truthfulqa" / "mc_task.json").read_text())
    (root / "multiple_choice").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": r["question"], "mc1_targets": _hf_targets(r["mc1_targets"]),
                                          "mc2_targets": _hf_targets(r["mc2_targets"])} for r in mc]),
                   root / "multiple_choice" / "validation-00000-of-00001.parquet")
    with open(shared_data / "truthfulqa" / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as fh:
        gen = [{"type": r["Type"], "category": r["Category"], "question": r["Question"], "best_answer": r["Best Answer"],
                "correct_answers": [a.strip() for a in r["Correct Answers"].split(";")],
                "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";")], "source": r["Source"]}
               for r in csv.DictReader(fh)]
    (root / "generation").mkdir()
    pq.write_table(pa.Table.from_pylist(gen), root / "generation" / "validation-00000-of-00001.parquet")
    return root


def test_truthfulqa_from_a_copy_of_the_hub_repository(truthful_qa_repo, shared_data):
    hub = truthfulqa_data.load_items(str(truthful_qa_repo))
    orig = truthfulqa_data.load_items(str(shared_data / "truthfulqa" / "mc_task.json"))
    assert len(hub) == len(orig) == 817
    assert [(i.question, i.mc1_targets, i.mc2_targets) for i in hub] == [(i.question, i.mc1_targets, i.mc2_targets) for i in orig]
    # categories come from the generation configuration, as from TruthfulQA.csv beside mc_task.json
    assert [i.category for i in hub] == [i.category for i in orig] and hub[0].category
    gen = truthfulqa_data.load_gen_items(str(truthful_qa_repo), limit=5)
    assert gen == truthfulqa_data.load_gen_items(str(shared_data / "truthfulqa" / "TruthfulQA.csv"), limit=5)


def test_truthfulqa_from_save_to_disk_and_a_seeded_sample(truthful_qa_repo, tmp_path, shared_data):
    import datasets

    rows = json.loads((shared_data / "truthfulqa" / "mc_task.json").read_text())[:30]
    ds = datasets.Dataset.from_list([{"question": r["question"], "mc1_targets": _hf_targets(r["mc1_targets"]),
                                      "mc2_targets": _hf_targets(r["mc2_targets"])} for r in rows])
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "tqa" / "multiple_choice"))
    items = truthfulqa_data.load_items(str(tmp_path / "tqa"))
    assert [i.question for i in items] == [r["question"] for r in rows]
    s1 = truthfulqa_data.load_items(str(truthful_qa_repo), sample=200, seed=0)
    s2 = truthfulqa_data.load_items(str(truthful_qa_repo), sample=200, seed=0)
    s3 = truthfulqa_data.load_items(str(truthful_qa_repo), sample=200, seed=1)
    assert len(s1) == 200 and [i.question for i in s1] == [i.question for i in s2] != [i.question for i in s3]
    assert (truthfulqa_data.dataset_label(str(truthful_qa_repo), 200, sample=200)
            == "TruthfulQA MC (200 questions, seeded sample, seed 0)")
    assert truthfulqa_data.dataset_label("bundled:truthfulness", 50) == "bundled truthfulness probe (50 items, not TruthfulQA)"


def test_a_folder_without_the_split_says_what_it_expected(tmp_path):
    (tmp_path / "multiple_choice").mkdir()
    with pytest.raises(DataError, match="no data files for split 'validation'.*validation-00000-of-00001.parquet"):
        truthfulqa_data.load_items(str(tmp_path))


def test_toxigen_from_the_hub_dataset_layout_gives_the_same_sample(shared_data, tmp_path):
    """toxigen/toxigen-data's train configuration (prompt, group, prompt_label; prompts repeat across rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = shared_data / "toxigen" / "prompts"
    rows = []
    for f in sorted(folder.glob("*_1k.txt")):
        ptype, group = f.name.split("_", 1)[0], f.name.split("_", 1)[1][:-len("_1k.txt")]
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows += [{"prompt": line, "generation": "g", "group": group, "prompt_label": int(ptype == "hate")}] * 2
    (tmp_path / "toxigen-data" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "toxigen-data" / "train" / "train-00000-of-00001.parquet")
    from_files = toxigen.sample_prompts(folder, per_group=4, seed=3)
    from_hub_layout = toxigen.sample_prompts(tmp_path / "toxigen-data", per_group=4, seed=3)
    assert [(p.text, p.group, p.prompt_type) for p in from_hub_layout] == [(p.text, p.group, p.prompt_type) for p in from_files]
    assert len(from_files) == 4 * 31
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "- a\\n-", "group": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1.*prompt_label"):
        toxigen.sample_prompts(bad, per_group=1)


def test_hh_rlhf_from_a_copy_of_the_hub_repository(shared_data, tmp_path):
    """Anthropic/hh-rlhf: data_dir folders with <split>.jsonl.gz (subset = data_dir, as on the Hub)."""
    repo = tmp_path / "hh-rlhf"
    (repo / "helpful-base").mkdir(parents=True)
    shutil.copy(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", repo / "helpful-base" / "test.jsonl.gz")
    assert local_dataset_files(repo, "test", "helpful-base") == [repo / "helpful-base" / "test.jsonl.gz"]
    via_repo = load_comparisons(DataSource(path=str(repo), subset="helpful-base", split="test", limit=50))
    direct = load_comparisons(DataSource(path=str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"), limit=50))
    assert [(c.prompt, c.chosen_response) for c in via_repo] == [(c.prompt, c.chosen_response) for c in direct]
    # the prompt side keeps the preferred answer as the reference
    p = load_prompts(DataSource(path=str(repo), subset="helpful-base", split="test", limit=3))
    assert p[0].reference == direct[0].chosen_response
    with gzip.open(repo / "helpful-base" / "test.jsonl.gz", "rt") as fh:
        assert json.loads(fh.readline())["chosen"].startswith("\n\nHuman:")


def test_prompts_with_references_from_dialogue_and_instruction_data(tmp_path, shared_data):
    seeds = load_prompts(str(shared_data / "instruct" / "self_instruct_seed_tasks.jsonl"))
    assert len(seeds) == 175 and all(p.reference for p in seeds)
    sft = load_prompts("bundled:sft")
    assert all(p.reference for p in sft if p.messages[-1]["role"] == "user")
    assert {p.category for p in sft} == {"helpfulness", "safety"}
    assert any("borderline" in p.tags for p in sft)
