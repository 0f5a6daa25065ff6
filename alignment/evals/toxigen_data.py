"""ToxiGen's prompts: the layouts they come in and the two seeded draws a round's eval continues.

Split out of ``alignment.evals.toxigen`` (which re-exports these names): ToxiGen's prompt files
(``hate_<group>_1k.txt`` / ``neutral_<group>_1k.txt``, one prompt a line) or the Hugging Face dataset
``toxigen/toxigen-data`` (local copy or ``hub:``), each distinct prompt once (``prompt_lists``); the test
draw (``sample_prompts``: ``per_group`` lines per list, seeded per file) and the validation draw
(``validation_prompts``: as many from the lines the test draw leaves, seeded apart; ``draw_free``).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_FILE = re.compile(r"^(hate|neutral)_(.+?)(_1k)?\.txt$")


@dataclass
class ToxiGenPrompt:
    text: str  # real newlines
    group: str
    prompt_type: str  # hate | neutral
    source: str  # file:line


def fix_newlines(line: str) -> str:
    """ToxiGen joins statements with a literal backslash-n; make it a newline."""
    return line.replace("\\n", "\n")


def sample_prompts(folder: str | Path, *, per_group: int = 20, types: Sequence[str] = ("hate", "neutral"), seed: int = 0,
                   groups: Sequence[str] | None = None) -> list[ToxiGenPrompt]:
    """``per_group`` lines from each prompt file of the given types (all lines when fewer), seeded per file."""
    from data.errors import DataError

    bad = [t for t in types if t not in ("hate", "neutral")]
    if bad:
        raise ValueError(f"prompt types must be hate and/or neutral, got {bad}")
    lists = prompt_lists(folder)
    known = {group for _, group in lists}
    if groups:
        unknown = sorted(set(groups) - known)
        if unknown:
            raise ValueError(f"unknown groups {unknown}; the data has {sorted(known)}")
    out: list[ToxiGenPrompt] = []
    for (ptype, group), (name, lines) in sorted(lists.items()):
        if ptype not in types or (groups and group not in groups):
            continue
        rng = random.Random(f"{seed}:{name}")  # a file's sample does not depend on which other files exist
        picked = sorted(rng.sample(range(len(lines)), min(per_group, len(lines))))
        out += [ToxiGenPrompt(fix_newlines(lines[i][1]).rstrip(), group, ptype, f"{name}:{lines[i][0]}") for i in picked]
    if not out:
        raise DataError(f"no prompts of types {list(types)}", path=str(folder))
    return out


def validation_prompts(folder: str | Path, *, per_group: int = 20, types: Sequence[str] = ("hate", "neutral"), seed: int = 0,
                       groups: Sequence[str] | None = None) -> list[ToxiGenPrompt]:
    """``per_group`` lines from each prompt file that ``sample_prompts`` with the same arguments (the test draw) does
    not pick, drawn with ``random.Random(f"validation:{seed}:{file}")``, in line order (all free lines when fewer)."""
    test = {p.source for p in sample_prompts(folder, per_group=per_group, types=types, seed=seed, groups=groups)}
    out = draw_free(folder, per_group=per_group, taken=test, label=f"validation:{seed}", types=types, groups=groups)
    if not out:
        from data.errors import DataError

        raise DataError(f"no validation prompts of types {list(types)} left beside the test draw", path=str(folder))
    return out


def draw_free(folder: str | Path, *, per_group: int, taken: set[str], label: str, types: Sequence[str] = ("hate", "neutral"),
              groups: Sequence[str] | None = None) -> list[ToxiGenPrompt]:
    """``per_group`` lines of each prompt file whose source (``file:line``) is not in ``taken``, drawn with
    ``random.Random(f"{label}:{file}")``, in line order (all free lines when fewer)."""
    out: list[ToxiGenPrompt] = []
    for (ptype, group), (name, lines) in sorted(prompt_lists(folder).items()):
        if ptype not in types or (groups and group not in groups):
            continue
        free = [(i, text) for i, text in lines if f"{name}:{i}" not in taken]
        picked = sorted(random.Random(f"{label}:{name}").sample(free, min(per_group, len(free))))
        out += [ToxiGenPrompt(fix_newlines(text).rstrip(), group, ptype, f"{name}:{i}") for i, text in picked]
    return out


def prompt_lists(source: str | Path) -> dict[tuple[str, str], tuple[str, list[tuple[int, str]]]]:
    """(type, group) -> (list name, [(line or row number, prompt)]) from ToxiGen's prompt files, or from
    a Hugging Face copy of ToxiGen's data (``toxigen/toxigen-data``, configuration ``train``: rows with
    ``prompt``, ``group`` and ``prompt_label`` 1 = hate / 0 = neutral), each distinct prompt once,
    local (a folder or a file) or ``hub:toxigen/toxigen-data``.

    A Hub row list is named like the file it came from (``hate_<group>_1k.txt``), so the same prompts
    give the same seeded sample in both layouts."""
    from data.errors import DataError
    from data.loaders import local_dataset_files, read_text_file, source_rows

    source = str(source)
    folder = Path(source)
    files = sorted(p for p in folder.iterdir() if _FILE.match(p.name)) if folder.is_dir() else []
    if files:
        out = {}
        for f in files:
            m = _FILE.match(f.name)
            assert m is not None
            lines = [(i + 1, line) for i, line in enumerate(read_text_file(f).splitlines()) if line.strip()]
            out[(m.group(1), m.group(2))] = (f.name, _distinct(lines))
        return out
    if source.startswith("hub:"):
        where, rows = source_rows(source, split="train", subset="train")
    elif folder.is_dir() and local_dataset_files(folder, "train", "train"):
        where, rows = source_rows(source, split="train", subset="train")
    elif folder.is_file():
        where, rows = source_rows(source)
    else:
        raise DataError("ToxiGen prompts not found: expected a folder of hate_<group>_1k.txt / neutral_<group>_1k.txt files "
                        "(microsoft/TOXIGEN prompts/), a local copy of the Hub dataset toxigen/toxigen-data "
                        "(train/train-*.parquet), or hub:toxigen/toxigen-data", path=source)
    lists: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for lineno, row in rows:
        for key in ("prompt", "prompt_label"):
            if key not in row:
                raise DataError("missing column (a ToxiGen prompt row has prompt, group, prompt_label)",
                                path=where, line=lineno, key=key)
        group = row.get("group", row.get("target_group"))
        label = row["prompt_label"]
        if label not in (0, 1, "0", "1") or not isinstance(row["prompt"], str) or not group:
            raise DataError(f"expected prompt text, a group and prompt_label 0/1, got {label!r}", path=where,
                            line=lineno, key="prompt_label")
        lists[("hate" if int(label) == 1 else "neutral", str(group))].append((lineno, row["prompt"]))
    if not lists:
        raise DataError("no prompts", path=where)
    return {k: (f"{k[0]}_{k[1]}_1k.txt", _distinct(v)) for k, v in lists.items()}


def _distinct(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Each prompt once, at its first occurrence (the published files repeat about 10% of their lines;
    the Hub dataset repeats a prompt once per generation)."""
    seen: set[str] = set()
    out = []
    for n, text in lines:
        if text not in seen:
            seen.add(text)
            out.append((n, text))
    return out
