"""A gold reward model grounded in human preferences: trained once on Anthropic HH-RLHF, frozen, cached.

    align gold build [--data FILE_OR_HUB ...] [--pairs 3000] [--name hh-smollm2]
    align gold show [--name hh-smollm2]
    align gold pack --name hh-smollm2 --out DIR     # fp16 LoRA weights + card, to keep or carry elsewhere
    align gold unpack DIR [--name NAME]             # back into the cache

Gao, Schulman & Hilton (2022) study reward-model over-optimisation with a *gold* reward model
trained on human labels: it labels comparisons in place of people, *proxy* reward models learn
from those labels, the policy optimises the proxies, and the gold scores the result. This module
builds that gold for the embedded model: SmolLM2-135M-Instruct with a scalar head (LoRA, as
``align rm`` trains it), trained for one epoch on HH-RLHF helpful-base and harmless-base pairs
(Bai et al. 2022's helpful-and-harmless preference data; no strength ratings, so margin 0).

Prompts are partitioned by a stable hash of their first human turn (lower-cased, whitespace
collapsed), independent of any seed: ``train`` (65%) trains the gold, ``held_out`` (10%) measures
it, and the rest is ``policy``, the only HH prompts a project may use for its prompt sets. The
card (``card.json``) records the data files with SHA-256, the pair counts, the held-out accuracy
with a Wilson 95% CI beside the length baseline (the longer answer wins) and the accuracy where the
chosen answer is the longer / the shorter one, and the hashes of every train and held-out prompt,
so :func:`gold_prompt_keys` lets a project drop them (``data.heldout`` does).

The cache: ``$ALIGN_CACHE/gold/<name>/`` (``model/`` is a reward model ``reward.load_scorer``
reads; ``card.json``). Built into a temporary folder and renamed into place. ``gold:<name>``
names it wherever a reward model is expected (``reward.load_scorer`` resolves it).

On these 2 CPU cores a build of ~3,000 pairs takes about an hour and a half; a GPU builds a larger
gold in minutes (``--model`` another base, ``--pairs`` more; the card records what was built).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward.gold_cache import (  # noqa: F401 - the gold's public names, with its builder
    DEFAULT_NAME,
    PARTITION,
    first_turn,
    gold_dir,
    gold_prompt_keys,
    load_card,
    normalise,
    partition_of,
    prompt_key,
    resolve,
    weakness,
)

log = logging.getLogger(__name__)

HUB_SOURCES = ("hub:Anthropic/hh-rlhf@helpful-base", "hub:Anthropic/hh-rlhf@harmless-base")
BUILD_VERSION = 1


def _source(spec: str) -> Any:
    """A data source for ``spec``: a file or folder, or ``hub:<id>@<subset>``; harmless data is safety."""
    from data.loaders import DataSource

    category = "safety" if "harmless" in spec else "helpfulness"
    if spec.startswith("hub:") and "@" in spec:
        path, subset = spec.split("@", 1)
        return DataSource(path=path, subset=subset, split="test", category=category)
    return DataSource(path=spec, category=category)


def split_pairs(pairs: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"train": [], "held_out": [], "policy": []}
    for c in pairs:
        out[partition_of(c.prompt)].append(c)
    return out


def cap_pairs(pairs: list[Any], n: int, seed: int) -> list[Any]:
    """At most ``n`` pairs, the same share of each category (a seeded draw)."""
    import random

    if len(pairs) <= n:
        return list(pairs)
    rng = random.Random(seed)
    by_cat: dict[str, list[Any]] = {}
    for c in pairs:
        by_cat.setdefault(c.category or "", []).append(c)
    out = []
    for items in by_cat.values():
        rng.shuffle(items)
        out += items[: round(n * len(items) / len(pairs))]
    rng.shuffle(out)
    return out[:n]


def length_split(chosen: Sequence[float], rejected: Sequence[float], pairs: Sequence[Any]) -> dict:
    out = {}
    for name, keep in (("chosen_longer", lambda c: len(c.chosen_response) > len(c.rejected_response)),
                       ("chosen_shorter", lambda c: len(c.chosen_response) < len(c.rejected_response))):
        idx = [i for i, c in enumerate(pairs) if keep(c)]
        out[name] = {"n": len(idx), "accuracy": sum(chosen[i] > rejected[i] for i in idx) / len(idx) if idx else None}
    return out


def top_layers(model: str, n: int | None) -> list[int] | None:
    """The indices of ``model``'s top ``n`` transformer layers (None: all layers)."""
    if not n:
        return None
    from transformers import AutoConfig

    from foundation.models import resolve as resolve_model

    total = AutoConfig.from_pretrained(resolve_model(model).path).num_hidden_layers
    return list(range(max(0, total - n), total))


def build(data: Sequence[str], *, name: str = DEFAULT_NAME, pairs: int = 3000, model: str = "smollm2-135m",
          max_length: int = 320, lr: float = 3e-4, batch_size: int = 8, lora_r: int = 16, seed: int = 0,
          layers: int | None = None, force: bool = False) -> Path:
    """Train the gold on ``data`` (HH-RLHF files, folders or hub specs) and cache it; returns its folder.
    ``layers``: LoRA in the top this many layers only (None: all)."""
    from foundation.config import load_config
    from foundation.runs import file_sha256
    from data.loaders import load_comparisons, write_jsonl
    from reward import rm
    from reward.model import load_scorer
    from reward.evaluate import pair_metrics, score_pairs

    final = gold_dir(name)
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists: `align gold show --name {name}`, or rebuild with --force")
    t0 = time.time()
    files, every = [], []
    for spec in data:
        src = _source(spec)
        got = load_comparisons(src)
        log.info("%s: %d pairs", spec, len(got))
        every += got
        p = Path(spec)
        if p.is_file():
            files.append({"path": str(p.resolve()), "sha256": file_sha256(p), "pairs": len(got), "category": src.category})
        else:
            files.append({"path": spec, "pairs": len(got), "category": src.category})
    parts = split_pairs(every)
    train = cap_pairs(parts["train"], pairs, seed)
    held = parts["held_out"]
    if len(train) < 100 or len(held) < 50:
        raise ValueError(f"too little data for a gold model: {len(train)} training and {len(held)} held-out pairs")
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    # a fixed work folder with checkpoints every 25 steps: a build killed (a session ending, a reboot) continues
    # from its last checkpoint when run again with the same arguments; other arguments start it afresh
    tmp = root / f".{name}-build"
    settings = {"data": [f.get("sha256", f["path"]) for f in files], "pairs": pairs, "model": model, "max_length": max_length,
                "lr": lr, "batch_size": batch_size, "lora_r": lora_r, "seed": seed, "layers": layers}
    same = (tmp / "settings.json").is_file() and json.loads((tmp / "settings.json").read_text()) == settings
    resume = same and bool(list((tmp / "rm" / "checkpoints").glob("checkpoint-*")))
    if not same:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "settings.json").write_text(json.dumps(settings))
    elif resume:
        log.info("continuing the build in %s from its last checkpoint", tmp)
    else:
        shutil.rmtree(tmp / "rm", ignore_errors=True)  # killed before its first checkpoint: start the training again
    try:
        write_jsonl(tmp / "train.jsonl", [c.to_dict() for c in train], overwrite=True)
        cfg = load_config(rm.RMConfig, Path(__file__).resolve().parents[1] / "configs" / "rm_helpful.yaml", [
            f"model.name={model}", f"run.output_dir={tmp / 'rm'}", "run.wandb=disabled", f"run.seed={seed}",
            f"data.sources=[{{path: '{tmp / 'train.jsonl'}', format: comparison}}]", "data.focus_share=null",
            "data.val_fraction=0.0", "margin=none", "train.num_epochs=1", f"train.batch_size={batch_size}",
            "train.grad_accum=1", f"train.lr={lr}", f"train.max_length={max_length}", "train.logging_steps=10",
            "train.save_steps=25", f"adapter.r={lora_r}", f"adapter.alpha={2 * lora_r}", "eval_batch_size=16",
            f"adapter.layers={json.dumps(top_layers(model, layers))}"], stage="rm")
        out = rm.main(cfg, resume=resume)
        shutil.move(str(out / "model"), str(tmp / "model"))
        summary = json.loads((out / "summary.json").read_text())
        scorer = load_scorer(str(tmp / "model"))
        chosen_t, rejected_t = score_pairs(scorer, held)
        metrics = pair_metrics(chosen_t, rejected_t, held)
        chosen, rejected = chosen_t.tolist(), rejected_t.tolist()
        longer = sum(len(c.chosen_response) > len(c.rejected_response) for c in held)
        ties = sum(len(c.chosen_response) == len(c.rejected_response) for c in held)
        by_cat = {}
        for cat in sorted({c.category or "" for c in held}):
            idx = [i for i, c in enumerate(held) if (c.category or "") == cat]
            by_cat[cat] = {"n": len(idx), "accuracy": sum(chosen[i] > rejected[i] for i in idx) / len(idx)}
        card = {
            "name": name, "build_version": BUILD_VERSION, "base_model": model,
            "adapter": f"LoRA r{lora_r}" + (f" in the top {layers} layers" if layers else ""),
            "data": files, "partition": {k: v for k, v in PARTITION} | {"policy": round(1 - sum(v for _, v in PARTITION), 4)},
            "pairs": {"train": len(train), "train_available": len(parts["train"]), "held_out": len(held),
                      "policy_partition": len(parts["policy"])},
            "held_out": {"accuracy": metrics["accuracy"], "ci95": metrics["ci95"], "n": metrics["n"],
                         "length_baseline": (longer + 0.5 * ties) / len(held), "by_length": length_split(chosen, rejected, held),
                         "by_category": by_cat},
            "train": {"loss": summary.get("train_loss"), "seconds": summary.get("train_seconds"), "max_length": max_length,
                      "lr": lr, "batch_size": batch_size, "epochs": 1, "seed": seed},
            "prompt_keys": {"train": sorted({prompt_key(c.prompt) for c in train}),
                            "held_out": sorted({prompt_key(c.prompt) for c in held})},
            "seconds": round(time.time() - t0, 1),
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        shutil.rmtree(tmp / "rm", ignore_errors=True)
        (tmp / "train.jsonl").unlink()
        (tmp / "settings.json").unlink()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except (ValueError, TypeError):
        shutil.rmtree(tmp, ignore_errors=True)  # bad input: nothing worth continuing
        raise
    return final


def describe(card: dict) -> str:
    h = card["held_out"]
    lo, hi = h["ci95"]
    by = h["by_length"]
    return (f"gold {card['name']}: {card['base_model']} + {card['adapter']} on {card['pairs']['train']} HH-RLHF pairs; "
            f"held out {100 * h['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] n={h['n']} "
            f"(length baseline {100 * h['length_baseline']:.1f}%; chosen longer {_pct(by['chosen_longer'])}, "
            f"chosen shorter {_pct(by['chosen_shorter'])})")


def _pct(block: dict) -> str:
    return "-" if block["accuracy"] is None else f"{100 * block['accuracy']:.1f}% (n={block['n']})"


def pack(name: str, out: Path) -> Path:
    """A compact copy of the built gold ``name`` in the new folder ``out``, to keep in a repository or carry to another
    machine: ``card.json`` and ``model/`` packed by ``foundation.adapters.pack_folder`` (LoRA weights in fp16, no
    tokenizer). :func:`unpack` restores it into the cache. Only a LoRA gold packs."""
    from foundation.adapters import pack_folder

    card = load_card(name)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.packing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pack_folder(gold_dir(name) / "model", tmp / "model")
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unpack(folder: Path, *, name: str | None = None, force: bool = False) -> Path:
    """Restore a gold packed by :func:`pack` into the cache as ``gold:<name>`` (default: the name it was built under);
    returns its folder. Every file is checked against the pack's SHA-256 before anything is written."""
    from foundation.adapters import unpack_folder

    folder = Path(folder)
    if not (folder / "card.json").is_file():
        raise FileNotFoundError(f"{folder} is not a packed gold (no card.json; `align gold pack` writes one)")
    card = json.loads((folder / "card.json").read_text())
    name = name or card["name"]
    final = gold_dir(name)
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists: `align gold show --name {name}`, or unpack over it with --force")
    tmp = final.parent / f".{name}-unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack_folder(folder / "model", tmp / "model")
        card["name"] = name
        card["unpacked_from"] = {"folder": str(folder.resolve()), "weights": "float16"}
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cli(name: str, argv: Sequence[str]) -> int:
    from foundation.runs import setup_logging

    p = argparse.ArgumentParser(prog="align gold", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the gold reward model on HH-RLHF and cache it")
    b.add_argument("--data", action="append", default=None,
                   help="HH-RLHF data: a file (test.jsonl.gz), a local dataset folder or hub:<id>@<subset>; repeat for "
                        f"several (default: {' and '.join(HUB_SOURCES)}; harmless files are the safety category)")
    b.add_argument("--name", default=DEFAULT_NAME)
    b.add_argument("--pairs", type=int, default=3000, help="training pairs at most (a seeded draw, each category in its share)")
    b.add_argument("--model", default="smollm2-135m", help="base model of the gold")
    b.add_argument("--max-length", type=int, default=320,
                   help="tokens per sequence, cut from the left (the response stays); 320 keeps most HH dialogues")
    b.add_argument("--lr", type=float, default=3e-4)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--lora-r", type=int, default=16)
    b.add_argument("--top-layers", type=int, default=None,
                   help="LoRA in the top N layers only (faster on a CPU; top 6 at --max-length 128 learned nothing: "
                        "49.3%% held out, benchmarks/results/gold_hh-smollm2_attempt1.json)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild over an existing gold of this name")
    k = sub.add_parser("pack", help="a compact copy of a built gold (LoRA weights in fp16) to keep or carry elsewhere")
    k.add_argument("--name", default=DEFAULT_NAME)
    k.add_argument("--out", required=True, type=Path, help="a new folder")
    u = sub.add_parser("unpack", help="restore a packed gold into the cache")
    u.add_argument("folder", type=Path)
    u.add_argument("--name", default=None, help="cache it under this name (default: the name it was packed from)")
    u.add_argument("--force", action="store_true", help="replace a gold of that name already in the cache")
    s = sub.add_parser("show", help="print a built gold model's card")
    s.add_argument("--name", default=DEFAULT_NAME)
    s.add_argument("--json", action="store_true")
    a = p.parse_args(list(argv))
    setup_logging("info")
    if a.cmd == "build":
        try:
            folder = build(a.data or list(HUB_SOURCES), name=a.name, pairs=a.pairs, model=a.model, max_length=a.max_length,
                           lr=a.lr, batch_size=a.batch_size, lora_r=a.lora_r, seed=a.seed, layers=a.top_layers, force=a.force)
        except (FileExistsError, ValueError) as exc:
            print(f"align gold build: {exc}", file=sys.stderr)
            return 2
        print(describe(load_card(a.name)))
        print(folder)
        return 0
    if a.cmd == "pack":
        try:
            print(pack(a.name, a.out))
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"align gold pack: {exc}", file=sys.stderr)
            return 2
        return 0
    if a.cmd == "unpack":
        try:
            folder = unpack(a.folder, name=a.name, force=a.force)
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"align gold unpack: {exc}", file=sys.stderr)
            return 2
        print(describe(load_card(folder.name)))
        print(folder)
        return 0
    try:
        card = load_card(a.name)
    except FileNotFoundError as exc:
        print(f"align gold show: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in card.items() if k != "prompt_keys"}, indent=1) if a.json else describe(card))
    return 0
