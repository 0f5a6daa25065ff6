"""Instruction templates: turn task datasets into instruction prompts, FLAN-style.

A *family* holds several phrasings of one kind of task. Each example gets one phrasing, chosen by
a stable hash of its content and a seed, so the same example always gets the same prompt while the
dataset as a whole sees all phrasings (FLAN, Wei et al. 2021: several templates per task make
instruction tuning generalise across phrasings). ``templates_per_example > 1`` renders an example
with several distinct phrasings instead.

Families and the row keys they read (the answer key is last):

- ``instruction``: ``instruction``, optional ``input`` -> ``output`` (Alpaca, self-instruct)
- ``qa``: ``question`` -> ``answer``
- ``summarization``: ``text`` -> ``summary``
- ``classification``: ``text``, ``options`` (list or comma-separated) -> ``label``
- ``translation``: ``text``, ``target_language`` -> ``translation``
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from data.errors import DataError
from data.schemas import SFTExample


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    fields: tuple[str, ...]  # required input keys
    target: str  # the key holding the answer
    templates: tuple[str, ...]
    optional: tuple[str, ...] = ()  # keys that may be empty; `short_templates` serve rows without them
    short_templates: tuple[str, ...] = ()


FAMILIES: dict[str, TemplateFamily] = {
    f.name: f
    for f in [
        TemplateFamily(
            "instruction", ("instruction",), "output",
            templates=(
                "{instruction}\n\n{input}",
                "{instruction}\n\nInput: {input}",
                "Task: {instruction}\n\n{input}",
                "{input}\n\n{instruction}",
                "Here is some text:\n\"\"\"\n{input}\n\"\"\"\n{instruction}",
            ),
            optional=("input",),
            short_templates=(
                "{instruction}",
                "Task: {instruction}",
                "Please help me with this: {instruction}",
                "{instruction} Thanks!",
            ),
        ),
        TemplateFamily(
            "qa", ("question",), "answer",
            templates=(
                "{question}",
                "Q: {question}",
                "Answer the following question.\n\n{question}",
                "Question: {question}\nWhat is the answer?",
                "I have a question: {question}",
            ),
        ),
        TemplateFamily(
            "summarization", ("text",), "summary",
            templates=(
                "Summarize the following text.\n\n{text}",
                "{text}\n\nTL;DR:",
                "Write a short summary of this passage:\n\n{text}",
                "What is the main point of the text below?\n\n{text}",
                "Condense this into a few sentences:\n{text}",
            ),
        ),
        TemplateFamily(
            "classification", ("text", "options"), "label",
            templates=(
                "{text}\n\nWhich of these best describes the text above: {options}?",
                "Classify the following text into one of [{options}].\n\n{text}",
                "Text: {text}\nOptions: {options}\nAnswer with one option.",
                "Read this and pick the right label ({options}):\n{text}",
            ),
        ),
        TemplateFamily(
            "translation", ("text", "target_language"), "translation",
            templates=(
                "Translate into {target_language}:\n\n{text}",
                "{text}\n\nHow would you say this in {target_language}?",
                "Please translate the following text to {target_language}.\n{text}",
                "Give the {target_language} translation of: \"{text}\"",
            ),
        ),
    ]
}


def stable_unit(text: str, seed: int = 0) -> float:
    """A deterministic number in [0, 1) from a string and a seed (same on every machine)."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _field(row: dict, key: str, optional: bool = False) -> str:
    value = row.get(key)
    if isinstance(value, list) and key == "options":
        value = ", ".join(str(v) for v in value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return ""
        raise DataError("missing or empty", key=key)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    return value.strip()


def render(row: dict, family: str, *, seed: int = 0, templates_per_example: int = 1) -> list[SFTExample]:
    """Render a task row as ``templates_per_example`` dialogues with distinct phrasings."""
    if family not in FAMILIES:
        raise DataError(f"unknown template family {family!r}; available: {', '.join(FAMILIES)}", key="template")
    fam = FAMILIES[family]
    values = {k: _field(row, k) for k in fam.fields}
    values.update({k: _field(row, k, optional=True) for k in fam.optional})
    answer = _field(row, fam.target)
    use_short = any(not values[k] for k in fam.optional)
    pool = fam.short_templates if use_short else fam.templates
    key = "\x1f".join(values[k] for k in sorted(values))
    start = int(stable_unit(key, seed) * len(pool))
    n = min(templates_per_example, len(pool))
    out = []
    for i in range(n):
        tmpl = pool[(start + i) % len(pool)]
        user = tmpl.format(**values).strip()
        out.append(SFTExample(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            id=f"{row['id']}-t{(start + i) % len(pool)}" if row.get("id") else None,
            source=f"template:{family}",
        ))
    return out


def expand_self_instruct(row: dict, *, seed: int = 0, templates_per_example: int = 1) -> list[SFTExample]:
    """A self-instruct task (``instruction`` + ``instances[{input, output}]``) -> one example per instance."""
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataError("expected a non-empty list of {input, output}", key="instances")
    out: list[SFTExample] = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataError("expected an object", key=f"instances[{i}]")
        sub = {"instruction": row.get("instruction"), "input": inst.get("input", ""), "output": inst.get("output"),
               "id": f"{row.get('id', 'task')}-{i}"}
        try:
            out.extend(render(sub, "instruction", seed=seed, templates_per_example=templates_per_example))
        except DataError as exc:
            raise DataError(exc.message, key=f"instances[{i}].{exc.key}") from None
    return out
