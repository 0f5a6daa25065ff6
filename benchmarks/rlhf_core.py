"""RLHF's core path at CPU scale: Gao, Schulman & Hilton (2022)'s protocol on SmolLM2-135M.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks rlhf_core [--out runs/bench-rlhf-core] [--stages ...]

A **gold** reward model trained on human preferences (``reward.gold``: SmolLM2 + LoRA on HH-RLHF
helpful + harmless pairs, built once and cached) stands in for people. The SFT policy
(SmolLM2-135M-Instruct) answers prompts that neither the gold nor any decision saw; the gold labels
pairs of its answers; **proxy** reward models (``align rm``) learn from N of those labels; the policy
is optimised against the proxies and the gold scores the result:

1. ``prompts``: real user prompts (the first human turns of HH-RLHF helpful-base and harmless-base
   in the gold's *policy* partition, and the self-instruct seed tasks) split, seeded, into four
   disjoint sets: ``train`` (proxy data, PPO rollouts), ``fresh`` (agreement pairs), ``validation``
   (every decision: PPO's keep-best and early stopping) and ``test`` (the reported numbers only).
2. ``samples``: K answers per train prompt from the SFT policy (temperature 1), scored by the gold.
3. ``proxies``: gold-labelled pairs of those answers (the higher gold score is chosen; at most
   ``--pairs-per-prompt`` per prompt), nested subsets of N = 250, 1,000 and all (≥ 2,000), one proxy
   RM each (``align rm``, margin 0, one epoch).
4. ``agreement``: on fresh prompts, two answers each from another policy (the SFT model at
   temperatures 0.7 and 1.3), gold-labelled; each proxy's agreement with the gold (n, Wilson CI).
5. ``bon``: 16 answers per test prompt; best-of-n for n = 1, 2, 4, 8, 16 picked by each proxy and by
   the gold itself: the expected gold and proxy scores of the pick (the unbiased estimator over
   the 16: the sample ranked j-th by the picker is the best of a random n-subset with probability
   C(j-1, n-1) / C(16, n)), with the pick's length, against KL_bon = log n - (n-1)/n; bootstrap CIs.
6. ``ppo``: ``align ppo`` against the largest proxy, and **oracle PPO** against the gold itself
   (optimiser failure vs reward-model failure), each logging gold and proxy scores of its
   validation answers every ``--eval-every`` iterations beside the KL to its start; keep-best on
   the validation prompts (``alignment.rl.selection``).
7. ``final``: greedy answers of each returned policy and of the SFT model to the test prompts,
   scored by the gold: win rate (ties half, bootstrap CI), length-controlled win rate
   (``alignment.evals.lcwr``) and mean lengths.
8. ``replication``: the same comparison on the usable prompts that none of the four sets took (the
   rest of the same seeded list: 357 prompts in the run of record), alone and pooled with the test
   set. Added after the first test read (2026-12-06, declared in ``rlhf_core_history.jsonl`` before
   it ran) because the oracle's length-controlled CI at n = 128 was too wide to decide; the targets
   on the test set stand as read, the replication is reported beside them whatever it shows.
9. ``length_control``: the SFT model made as short as each PPO policy (an EOS-logit bias bisected on the
   validation prompts), each PPO policy against it on the test and replication prompts.
10. ``ppo_seeds`` (only when named, with ``--ppo-seeds 1,2`` and/or ``--oracle-seeds 1,2``): PPO against the
   largest proxy (oracle PPO against the gold) again with other seeds (``run.seed``: rollout sampling, prompt
   order, the adapters' initialisation; the same proxy, prompts and settings), each returned policy answering the
   test and replication prompts: the spread of the headline over PPO seeds (``ppo_seeds`` / ``ppo_oracle_seeds``
   in the results, one target each over every seed).

Every stage writes into ``--out`` and is skipped when its output is there (``--redo STAGE`` runs it
again). ``--state`` (tracked, ``benchmarks/state/rlhf_core``) keeps each finished stage's outputs and, packed in
fp16, the models later stages need; the gold is packed in ``--gold-packs`` (``benchmarks/state/gold``). A run on a
reset machine continues where the last one stopped instead of spending hours rebuilding them (``State``). Each run
appends a line to ``benchmarks/results/rlhf_core_history.jsonl``. Writes
``benchmarks/results/rlhf_core.json`` and the plots ``rlhf_core_bon.png``, ``rlhf_core_ppo.png``.

Targets (issue 26): the largest proxy agrees with the gold >= 70% on fresh pairs (CI low >= 65%);
best-of-16 by it gains >= 50% of what best-of-16 by the gold gains; PPO against it, at the
checkpoint chosen on validation prompts, beats its start by the gold on test prompts >= 60% with
the CI low > 50%, length-controlled too; oracle PPO >= 65%. With ``--ppo-seeds``: the proxy's PPO target on the
test + replication prompts in every seed (``ppo_proxy_seeds``); with ``--oracle-seeds``, the oracle's (``ppo_oracle_seeds``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foundation.runs import read_jsonl
from foundation.stats import wilson_interval

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SFT = "smollm2-135m"  # the default --policy
STAGES = ("prompts", "samples", "proxies", "agreement", "bon", "ppo", "final", "replication", "length_control")
EXTRA_STAGES = ("ppo_seeds",)  # run only when named in --stages (with --ppo-seeds / --oracle-seeds)
KINDS = {"proxy": "ppo_winrate", "oracle": "oracle_winrate"}  # PPO run kinds: ppo_<kind>[_seed<s>], and their target
TARGETS = {"agreement": 0.70, "agreement_ci_low": 0.65, "bon_ratio": 0.5, "ppo_winrate": 0.60, "oracle_winrate": 0.65}


# ---------------------------------------------------------------------------------------------
# the math (pure; tested in tests/test_benchmarks.py)


def kl_bon(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n-1)/n (Stiennon et al. 2020; Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n


def bon_weights(k: int, n: int) -> list[float]:
    """P(the sample ranked j-th of k, ascending, is the best of a random n-subset) = C(j-1, n-1) / C(k, n)."""
    total = math.comb(k, n)
    return [math.comb(j - 1, n - 1) / total for j in range(1, k + 1)]


def bon_expected(picker: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected ``values`` of the best-of-n (by ``picker``) over a random n-subset of the samples.
    Ties in ``picker`` are broken by position (a fixed order, as a reward model's ties would be)."""
    order = sorted(range(len(picker)), key=lambda i: (picker[i], -i))
    w = bon_weights(len(picker), n)
    return sum(w[j] * values[order[j]] for j in range(len(order)))


def pick_pairs(k: int, per_prompt: int, rng: random.Random) -> list[tuple[int, int]]:
    """``per_prompt`` distinct unordered pairs of k answers (all of them when fewer exist)."""
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    rng.shuffle(pairs)
    return pairs[:per_prompt]


def bootstrap_mean_ci(values: Sequence[float], seed: int = 0, n_boot: int = 2000) -> tuple[float, float]:
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def length_strata(wins: Sequence[float], pol: Sequence[dict], base: Sequence[dict], *, near: int = 10,
                  seed: int = 0) -> dict:
    """The win rate within length strata, a control that assumes no model of length (the length-controlled rate
    extrapolates a fitted curve to equal lengths): pairs whose answers differ by fewer than ``near`` tokens, and pairs
    where both answers were cut at the token limit (neither finished). Each stratum: {n, win_rate, CI} or None; and
    how many of the policy's answers are shorter / as long / longer than the baseline's."""
    from alignment.evals.winrate import summarise

    diffs = [p["tokens"] - b["tokens"] for p, b in zip(pol, base)]

    def stratum(keep: Sequence[bool]) -> dict | None:
        w = [x for x, k in zip(wins, keep) if k]
        return summarise(w, seed=seed) if w else None

    return {"near_tokens": near, "similar_length": stratum([abs(d) < near for d in diffs]),
            "both_cut": stratum([not p["finished"] and not b["finished"] for p, b in zip(pol, base)]),
            "shorter": sum(d < 0 for d in diffs), "same": sum(d == 0 for d in diffs), "longer": sum(d > 0 for d in diffs)}


# ---------------------------------------------------------------------------------------------
# helpers


def check_pair_sizes(sizes: Sequence[int], available: int) -> None:
    """The proxies' training sizes must be increasing (nested subsets) and at most the pairs the gold labelled
    (pairs with equal gold scores or identical answers are not labelled, so K answers give fewer than
    ``pairs_per_prompt`` pairs per prompt)."""
    if list(sizes) != sorted(set(sizes)) or not sizes or sizes[0] < 1:
        raise ValueError(f"--pairs must be increasing positive sizes, got {','.join(map(str, sizes))}")
    if sizes[-1] > available:
        raise ValueError(f"--pairs asks for {sizes[-1]} pairs, but the gold labelled {available} (pairs with equal gold "
                         f"scores or identical answers are left out): ask for at most {available}")


def _write(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.rename(path)


def _log(msg: str) -> None:
    print(f"[rlhf_core {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class State:
    """A tracked folder (``--state``) that keeps what each finished stage made, so that a machine reset, which takes
    ``--out`` and the model cache with it, costs at most the stage in progress: the stage's small files as they are,
    the trained models the later stages need (the gold, the largest proxy, the PPO policies) packed by
    ``foundation.adapters.pack_folder`` (LoRA weights in fp16, no tokenizer). ``restore`` copies back whatever ``--out``
    lacks; the fp16 rounding of a restored model is the only difference from the one trained."""

    def __init__(self, root: Path | None, out: Path) -> None:
        self.root, self.out = root, out

    def restore(self) -> list[str]:
        from foundation.adapters import unpack_folder

        got: list[str] = []
        if self.root is None:
            return got
        files, packed = self.root / "files", self.root / "packed"
        for f in sorted(files.rglob("*")) if files.is_dir() else []:
            dst = self.out / f.relative_to(files)
            if f.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
                got.append(str(f.relative_to(files)))
        for manifest in sorted(packed.rglob("PACKED.json")) if packed.is_dir() else []:
            rel = manifest.parent.relative_to(packed)
            if not (self.out / rel).exists():
                unpack_folder(manifest.parent, self.out / rel)
                got.append(f"{rel} (packed)")
        return got

    def keep(self, files: Sequence[str], models: Sequence[str] = ()) -> None:
        import shutil

        from foundation.adapters import pack_folder

        if self.root is None:
            return
        for rel in files:
            src = self.out / rel
            if src.is_file():
                dst = self.root / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
        for rel in models:
            dst = self.root / "packed" / rel
            if (self.out / rel / "adapter_config.json").is_file():
                tmp = dst.with_name(dst.name + ".packing")
                shutil.rmtree(tmp, ignore_errors=True)
                pack_folder(self.out / rel, tmp)
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}
        self._tok = self._model = None
        self._scorers: dict[str, Any] = {}
        self.state = State(None, self.out)  # main() sets the --state folder

    # models, loaded once per process
    def policy(self) -> tuple[Any, Any]:
        from foundation.models import load_causal_lm, load_tokenizer

        if self._model is None:
            self._tok, self._model = load_tokenizer(self.a.policy), load_causal_lm(self.a.policy)
        return self._model, self._tok

    def scorer(self, name: str) -> Any:
        from reward import load_scorer

        if name not in self._scorers:
            spec = self.a.gold if name == "gold" else str(self.out / name / "rm_helpful" / "model")
            self._scorers[name] = load_scorer(spec, batch_size=32)
        return self._scorers[name]

    def score(self, name: str, prompts: Sequence[list], responses: Sequence[str]) -> list[float]:
        return self.scorer(name).score(list(prompts), list(responses)).tolist()

    def generate(self, prompts: Sequence[list], *, temperature: float, seed: int, max_new_tokens: int | None = None) -> list:
        from foundation.generation import generate

        model, tok = self.policy()
        return generate(model, tok, list(prompts), max_new_tokens=max_new_tokens or self.a.new_tokens, temperature=temperature,
                        batch_size=self.a.gen_batch, seed=seed)

    def layers(self, top: int | None) -> str:
        from reward.gold import top_layers

        return json.dumps(top_layers(self.a.policy, top))

    def proxies(self) -> list[str]:
        return [f"proxy_{n}" for n in self.a.pairs]

    # -- 1. prompts --------------------------------------------------------------------------
    def usable_prompts(self) -> tuple[list, list[str], int]:
        """Every usable prompt in the seeded order the sets are cut from (the ``prompts`` stage and the
        ``replication`` stage draw the same list), the sources read, and how many gold prompts were excluded."""
        from foundation.generation import encode_prompts
        from data.loaders import DataSource, load_prompts
        from reward.gold import gold_prompt_keys, partition_of, prompt_key

        gold_name = self.a.gold.split(":", 1)[1]
        excluded = gold_prompt_keys(gold_name)
        pool, seen = [], set()
        sources = []
        for sub, category in (("helpful-base", "helpfulness"), ("harmless-base", "safety")):
            path = self.a.data / "hh-rlhf" / sub / "test.jsonl.gz"
            sources.append(str(path))
            for r in load_prompts(DataSource(path=str(path), turns="first", category=category)):
                if partition_of(r.messages) == "policy":
                    pool.append(r)
        path = self.a.data / "instruct" / "self_instruct_seed_tasks.jsonl"
        sources.append(str(path))
        pool += load_prompts(DataSource(path=str(path), category="helpfulness"))
        _, tok = self.policy()
        lengths = [len(x) for x in encode_prompts(tok, [r.messages for r in pool])]
        kept = []
        for r, n in zip(pool, lengths):
            key = prompt_key(r.messages)
            if key in excluded or key in seen or n > self.a.max_prompt_tokens:
                continue
            seen.add(key)
            kept.append(r)
        random.Random(self.a.seed).shuffle(kept)
        return kept, sources, len(excluded)

    def stage_prompts(self) -> None:
        from reward.gold import prompt_key

        kept, sources, excluded = self.usable_prompts()
        sizes = {"test": self.a.test_prompts, "validation": self.a.val_prompts, "fresh": self.a.fresh_prompts,
                 "train": self.a.train_prompts}
        if sum(sizes.values()) > len(kept):
            raise ValueError(f"{len(kept)} usable prompts, {sum(sizes.values())} asked for")
        (self.out / "prompts").mkdir(exist_ok=True)
        start, counts = 0, {}
        for name, size in sizes.items():
            part = kept[start:start + size]
            start += size
            _write(self.out / "prompts" / f"{name}.jsonl", [r.to_dict() for r in part])
            counts[name] = {"n": len(part), "safety": sum(r.category == "safety" for r in part)}
        keys = {name: {prompt_key(r["messages"]) for r in read_jsonl(self.out / "prompts" / f"{name}.jsonl")} for name in sizes}
        for a_name in sizes:
            for b_name in sizes:
                if a_name < b_name and keys[a_name] & keys[b_name]:
                    raise AssertionError(f"prompt sets {a_name} and {b_name} overlap")
        (self.out / "prompts" / "manifest.json").write_text(json.dumps(
            {"sources": sources, "usable": len(kept), "sets": counts, "excluded_gold_prompts": excluded,
             "max_prompt_tokens": self.a.max_prompt_tokens, "seed": self.a.seed, "disjoint": True}, indent=1))

    def prompts(self, name: str) -> list[dict]:
        return read_jsonl(self.out / "prompts" / f"{name}.jsonl")

    # -- 2. samples --------------------------------------------------------------------------
    def stage_samples(self) -> None:
        """K answers per train prompt, scored by the gold; in chunks of ``--sample-chunk`` prompts appended to
        ``samples.partial.jsonl`` (a killed run continues after the last whole chunk; chunk c samples with
        seed + c, so the result does not depend on where a run was killed)."""
        rows = self.prompts("train")
        partial = self.out / "samples.partial.jsonl"
        if "samples" in self.a.redo:
            partial.unlink(missing_ok=True)
        out = read_jsonl(partial) if partial.is_file() else []
        if out and [r["prompt"] for r in out] != [r["messages"] for r in rows[: len(out)]]:
            raise RuntimeError(f"{partial} holds other prompts than prompts/train.jsonl: delete it or use --redo samples")
        chunk = self.a.sample_chunk
        for start in range((len(out) // chunk) * chunk, len(rows), chunk):
            part = rows[start:start + chunk]
            convs = [r["messages"] for r in part for _ in range(self.a.k)]
            gens = self.generate(convs, temperature=1.0, seed=self.a.seed + start // chunk)
            gold = self.score("gold", convs, [g.text for g in gens])
            done = []
            for i, r in enumerate(part):
                block = range(i * self.a.k, (i + 1) * self.a.k)
                done.append({"prompt": r["messages"], "category": r.get("category"),
                             "samples": [{"text": gens[j].text, "tokens": len(gens[j].response_ids),
                                          "finished": gens[j].finished, "gold": gold[j]} for j in block]})
            out = out[:start] + done
            _write(partial, out)
            _log(f"samples: {len(out)}/{len(rows)} prompts")
        _write(self.out / "samples.jsonl", out)
        partial.unlink()

    # -- 3. proxies --------------------------------------------------------------------------
    def labelled_pairs(self) -> list[dict]:
        from data.schemas import Comparison

        rng = random.Random(self.a.seed)
        pairs = []
        for r in read_jsonl(self.out / "samples.jsonl"):
            s = r["samples"]
            for i, j in pick_pairs(len(s), self.a.pairs_per_prompt, rng):
                a, b = s[i], s[j]
                ta, tb = a["text"].strip(), b["text"].strip()
                if a["gold"] == b["gold"] or not ta or not tb or ta == tb:
                    continue
                c = Comparison(prompt=r["prompt"], response_a=a["text"], response_b=b["text"],
                               chosen="A" if a["gold"] > b["gold"] else "B", category=r.get("category"),
                               meta={"gold_a": a["gold"], "gold_b": b["gold"]})
                pairs.append(c.to_dict())
        rng.shuffle(pairs)  # nested subsets: the first N of one shuffled list
        return pairs

    def stage_proxies(self) -> None:
        pairs = self.labelled_pairs()
        check_pair_sizes(self.a.pairs, len(pairs))  # before any proxy trains
        _write(self.out / "pairs.jsonl", pairs)
        for n, name in zip(self.a.pairs, self.proxies()):
            if (self.out / name / "rm_helpful" / "model").is_dir() and name not in self.a.redo:
                continue
            data = self.out / f"{name}.jsonl"
            _write(data, pairs[:n])
            cmd = [sys.executable, "-m", "alignment.cli", "rm", "--config", str(REPO / "configs" / "rm_helpful.yaml"),
                   f"model.name={self.a.policy}", f"run.output_dir={self.out / name / 'rm_helpful'}", "run.wandb=disabled",
                   f"run.seed={self.a.seed}", f"data.sources=[{{path: '{data}', format: comparison}}]", "data.focus_share=null",
                   "data.val_fraction=0.0", "margin=none", "train.num_epochs=1", "train.batch_size=8", "train.grad_accum=1",
                   f"train.lr={self.a.rm_lr}", f"train.max_length={self.a.rm_max_length}", "train.logging_steps=10",
                   "train.save_steps=100000", "eval_batch_size=32", f"adapter.layers={self.layers(self.a.proxy_layers)}"]
            _log(f"{name}: align rm on {n} gold-labelled pairs")
            if (self.out / name).exists():
                import shutil

                shutil.rmtree(self.out / name)
            subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
            self.state.keep(["pairs.jsonl", f"{name}/rm_helpful/summary.json"], [f"{name}/rm_helpful/model"])

    # -- 4. agreement ------------------------------------------------------------------------
    def stage_agreement(self) -> None:
        rows = self.prompts("fresh")
        convs = [r["messages"] for r in rows]
        a = self.generate(convs, temperature=0.7, seed=self.a.seed + 1)
        b = self.generate(convs, temperature=1.3, seed=self.a.seed + 2)
        scores = {name: (self.score(name, convs, [g.text for g in a]), self.score(name, convs, [g.text for g in b]))
                  for name in ["gold", *self.proxies()]}
        out = [{"prompt": c, "a": ga.text, "b": gb.text, "len_a": len(ga.response_ids), "len_b": len(gb.response_ids),
                **{f"{k}_a": v[0][i] for k, v in scores.items()}, **{f"{k}_b": v[1][i] for k, v in scores.items()}}
               for i, (c, ga, gb) in enumerate(zip(convs, a, b))]
        _write(self.out / "agreement.jsonl", out)

    def agreement(self) -> dict:
        rows = [r for r in read_jsonl(self.out / "agreement.jsonl")
                if r["gold_a"] != r["gold_b"] and r["a"].strip() and r["b"].strip() and r["a"].strip() != r["b"].strip()]
        out = {}
        longer = sum((r["len_a"] > r["len_b"]) == (r["gold_a"] > r["gold_b"]) for r in rows if r["len_a"] != r["len_b"])
        n_len = sum(r["len_a"] != r["len_b"] for r in rows)
        out["length_rule"] = {"accuracy": longer / n_len if n_len else None, "n": n_len}
        # answer a is the cooler sample (temperature 0.7, b: 1.3): "a wins" is the baseline a proxy must beat, and its
        # agreement where the gold prefers the hotter answer shows it is not only telling temperatures apart
        a_wins = [r for r in rows if r["gold_a"] > r["gold_b"]]
        b_wins = [r for r in rows if r["gold_a"] < r["gold_b"]]
        out["cooler_answer_rule"] = {"accuracy": len(a_wins) / len(rows) if rows else None, "n": len(rows)}

        def agree(name: str, rs: list[dict]) -> dict:
            right = sum((r[f"{name}_a"] > r[f"{name}_b"]) == (r["gold_a"] > r["gold_b"]) for r in rs)
            lo, hi = wilson_interval(right, len(rs))
            return {"agreement": right / len(rs) if rs else None, "ci95": [lo, hi], "n": len(rs)}

        for name in self.proxies():
            out[name] = {"pairs": int(name.split("_")[1]), **agree(name, rows),
                         "gold_prefers_cooler": agree(name, a_wins), "gold_prefers_hotter": agree(name, b_wins)}
        return out

    # -- 5. best-of-n ------------------------------------------------------------------------
    def stage_bon(self) -> None:
        rows = self.prompts("test")
        convs = [r["messages"] for r in rows for _ in range(self.a.bon)]
        gens = self.generate(convs, temperature=1.0, seed=self.a.seed + 3)
        texts = [g.text for g in gens]
        scores = {name: self.score(name, convs, texts) for name in ["gold", *self.proxies()]}
        out = []
        for i, r in enumerate(rows):
            block = list(range(i * self.a.bon, (i + 1) * self.a.bon))
            out.append({"prompt": r["messages"], "texts": [texts[j] for j in block],
                        "tokens": [len(gens[j].response_ids) for j in block],
                        **{name: [s[j] for j in block] for name, s in scores.items()}})
        _write(self.out / "bon.jsonl", out)

    def bon(self) -> dict:
        rows = read_jsonl(self.out / "bon.jsonl")
        ns = [n for n in (1, 2, 4, 8, 16) if n <= self.a.bon]

        def curve(pick: Any, proxy: str | None) -> list[dict]:
            """Best-of-n by ``pick(row)`` (scores of the 16 answers): the pick's expected gold score and gain over
            n = 1 (CI), its length, and with ``proxy`` the picker's own score of it."""
            pts = []
            for n in ns:
                gold = [bon_expected(pick(r), r["gold"], n) for r in rows]
                gain = [g - sum(r["gold"]) / len(r["gold"]) for g, r in zip(gold, rows)]
                length = [bon_expected(pick(r), r["tokens"], n) for r in rows]
                pt = {"n": n, "kl": kl_bon(n), "gold": sum(gold) / len(gold), "gold_gain": sum(gain) / len(gain),
                      "gold_gain_ci": bootstrap_mean_ci(gain, self.a.seed), "tokens": sum(length) / len(length)}
                if proxy is not None:
                    own = [bon_expected(pick(r), r[proxy], n) for r in rows]
                    pt["proxy"] = sum(own) / len(own)
                pts.append(pt)
            return pts

        curves = {name: curve(lambda r, name=name: r[name], name) for name in ["gold", *self.proxies()]}
        # the sceptic's control: best-of-n by brevity alone (the shortest answer; ties, such as answers cut at the
        # token limit, by position, which is random order for independent samples). The gold prefers the shorter answer
        # of most pairs, so a picker (or a policy) can gain gold score by shortening; this is how much.
        shortest = curve(lambda r: [-t for t in r["tokens"]], None)
        top = self.proxies()[-1]
        g_gold, g_proxy = curves["gold"][-1]["gold_gain"], curves[top][-1]["gold_gain"]
        return {"prompts": len(rows), "samples": self.a.bon, "curves": curves, "controls": {"shortest": shortest},
                "ratio_best_proxy_to_gold": g_proxy / g_gold if g_gold else None, "best_proxy": top}

    # -- 6. PPO ------------------------------------------------------------------------------
    def ppo_cmd(self, name: str, reward: str, judges: dict[str, str], seed: int | None = None) -> list[str]:
        judge = "{" + ", ".join(f"{k}: '{v}'" for k, v in judges.items()) + "}"
        a = self.a
        return [sys.executable, "-m", "alignment.cli", "ppo", "--config", str(REPO / "configs" / "ppo.yaml"),
                f"model.name={a.policy}", f"run.output_dir={self.out / name}", "run.wandb=disabled",
                f"run.seed={a.seed if seed is None else seed}",
                f"reward.helpful={reward}", "reward.safety=null", "critic.init=reward_model",
                f"data.sources=[{{path: '{self.out / 'prompts' / 'train.jsonl'}'}}]",
                f"data.val_sources=[{{path: '{self.out / 'prompts' / 'validation.jsonl'}'}}]",
                f"train.max_steps={a.ppo_iterations}", f"train.lr={a.ppo_lr}", f"critic.lr={a.ppo_critic_lr}",
                f"ppo.rollout_batch_size={a.ppo_rollout}", f"ppo.minibatch_size={a.ppo_minibatch}",
                f"ppo.micro_batch_size={a.ppo_minibatch}", f"ppo.epochs={a.ppo_epochs}", f"ppo.kl_coef={a.ppo_kl}",
                f"sampling.max_new_tokens={a.new_tokens}", "sampling.temperature=1.0", f"sampling.batch_size={a.ppo_rollout}",
                f"eval.every={a.eval_every}", f"eval.max_prompts={a.val_prompts}", "eval.patience=0", f"eval.judges={judge}",
                f"eval.save_every={a.eval_every}", "reward.missing_eos_penalty=0", f"adapter.layers={self.layers(a.ppo_layers)}"]

    def stage_ppo(self) -> None:
        top = self.proxies()[-1]
        runs = {"ppo_proxy": (str(self.out / top / "rm_helpful" / "model"), {"gold": self.a.gold}),
                "ppo_oracle": (self.a.gold, {"proxy": str(self.out / top / "rm_helpful" / "model")})}
        for name, (reward, judges) in runs.items():
            self.run_ppo(name, reward, judges)

    def run_ppo(self, name: str, reward: str, judges: dict[str, str], seed: int | None = None) -> None:
        """``align ppo`` into ``--out/name`` unless it finished before (resumed from its checkpoints when it was
        stopped), then its summary, metrics and packed model kept in ``--state``."""
        if (self.out / name / "summary.json").is_file() and name not in self.a.redo:
            return
        resume = (self.out / name / "checkpoints").is_dir() and name not in self.a.redo
        if (self.out / name).exists() and not resume:
            import shutil

            shutil.rmtree(self.out / name)
        _log(f"{name}: align ppo against {reward}" + ("" if seed is None else f", seed {seed}"))
        subprocess.run([*self.ppo_cmd(name, reward, judges, seed), *(["--resume"] if resume else [])], check=True, cwd=REPO,
                       env={**os.environ, "WANDB_MODE": "disabled"})
        self.state.keep([f"{name}/summary.json", f"{name}/metrics.jsonl"], [f"{name}/model"])

    # -- 10. PPO against the proxy (and oracle PPO) with other seeds -----------------------------------------
    def seed_runs(self, kind: str = "proxy") -> dict[int, str]:
        """{PPO seed: run name} of the PPO runs of ``kind`` (``proxy``: against the largest proxy; ``oracle``:
        against the gold): ``--seed``'s is ``ppo_<kind>``, the others ``ppo_<kind>_seed<s>``: those ``--ppo-seeds``
        (``--oracle-seeds``) names and those already finished in ``--out`` (restored from ``--state``), so a run
        that does not name them still reports them."""
        prefix = f"ppo_{kind}_seed"
        done = [int(d.name.removeprefix(prefix)) for d in sorted(self.out.glob(prefix + "*"))
                if d.name.removeprefix(prefix).isdigit() and (d / "summary.json").is_file()]
        named = self.a.ppo_seeds if kind == "proxy" else self.a.oracle_seeds
        seeds = [s for s in dict.fromkeys([*named, *sorted(done)]) if s != self.a.seed]
        return {self.a.seed: f"ppo_{kind}", **{s: f"{prefix}{s}" for s in seeds}}

    def stage_ppo_seeds(self) -> None:
        if not self.a.ppo_seeds and not self.a.oracle_seeds:
            raise SystemExit("the ppo_seeds stage needs --ppo-seeds and/or --oracle-seeds (e.g. --ppo-seeds 1,2)")
        top = str(self.out / self.proxies()[-1] / "rm_helpful" / "model")
        runs = {"proxy": (self.a.ppo_seeds, top, {"gold": self.a.gold}),
                "oracle": (self.a.oracle_seeds, self.a.gold, {"proxy": top})}
        for kind, (named, reward, judges) in runs.items():
            for seed, name in self.seed_runs(kind).items():
                if seed == self.a.seed or seed not in named:
                    continue
                self.run_ppo(name, reward, judges, seed)
                for prompt_set in ("test", "replication"):
                    if (self.out / "prompts" / f"{prompt_set}.jsonl").is_file():
                        self.answer(prompt_set, ("sft", name))
                self.state.keep(*self.kept("ppo_seeds"))

    def ppo_seeds(self, kind: str = "proxy") -> dict:
        """Each seed's PPO policy of ``kind`` against the SFT model on the test prompts, the replication prompts and
        both pooled, and the spread of those win rates over the seeds (only seeds whose answers are all there)."""
        seeds: dict[str, Any] = {}
        sets = [s for s in ("test", "replication") if (self.out / f"{s}_sft.jsonl").is_file()]
        for seed, name in self.seed_runs(kind).items():
            if not sets or not all((self.out / f"{s}_{name}.jsonl").is_file() for s in sets):
                continue
            summary = json.loads((self.out / name / "summary.json").read_text())
            got = {"run": name, "returned": summary.get("returned"), "best_iteration": summary.get("best_iteration"),
                   "returned_note": summary.get("returned_note")}
            for label, chosen in ({s: (s,) for s in sets} | ({"pooled": tuple(sets)} if len(sets) > 1 else {})).items():
                sft = [r for s in chosen for r in read_jsonl(self.out / f"{s}_sft.jsonl")]
                pol = [r for s in chosen for r in read_jsonl(self.out / f"{s}_{name}.jsonl")]
                if [r["prompt"] for r in pol] != [r["prompt"] for r in sft]:
                    raise AssertionError(f"{name}'s answers and the SFT model's are not to the same prompts ({chosen})")
                got[label] = self.compare(pol, sft)
            seeds[str(seed)] = got
        if len(seeds) < 2:
            return {}
        key = "pooled" if len(sets) > 1 else sets[0]
        spread = {}
        for metric, pick in (("win_rate", lambda g: g[key]["winrate_vs_sft"]["win_rate"]),
                             ("lc_win_rate", lambda g: g[key]["lc_winrate_vs_sft"]["lc_win_rate"]),
                             ("gold_mean", lambda g: g[key]["gold_mean"])):
            values = [pick(g) for g in seeds.values()]
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            spread[metric] = {"values": values, "mean": mean, "sd": sd}
        return {"prompt_sets": key, "seeds": seeds, "spread": spread}

    def ppo(self) -> dict:
        out = {}
        seeds = [n for kind in KINDS for n in self.seed_runs(kind).values() if n != f"ppo_{kind}"]
        for name in ("ppo_proxy", "ppo_oracle", *seeds):
            folder = self.out / name
            if not (folder / "summary.json").is_file():
                continue
            rows = read_jsonl(folder / "metrics.jsonl")
            kl = {r["step"]: r["kl/ref"] for r in rows if "kl/ref" in r}
            evals = [r for r in rows if "eval/reward_combined" in r]
            against_proxy = not name.startswith("ppo_oracle")
            other = "gold" if against_proxy else "proxy"
            curve = []
            for r in evals:
                near = [kl[s] for s in range(max(1, r["step"] - 4), r["step"] + 1) if s in kl]  # the rollouts around it
                k = max(0.0, sum(near) / len(near)) if near else 0.0
                reward = r["eval/reward_combined"]
                judged = r.get(f"eval/reward_judge_{other}")
                curve.append({"iteration": r["step"], "kl": k, "sqrt_kl": math.sqrt(k),
                              "gold": judged if against_proxy else reward,
                              "proxy": reward if against_proxy else judged, "length": r.get("eval/length")})
            out[name] = {"curve": curve, "summary": json.loads((folder / "summary.json").read_text())}
        return out

    # -- 7. final comparison on test prompts -------------------------------------------------
    POLICIES = ("sft", "ppo_proxy", "ppo_oracle")

    def stage_final(self) -> None:
        self.answer("test")

    def answer(self, prompt_set: str, policies: Sequence[str] = POLICIES) -> None:
        """Greedy answers of the SFT model and of each returned policy (``policies``: run names, ``sft``) to
        ``prompt_set``, scored by the gold and the largest proxy, into ``<prompt_set>_<policy>.jsonl``."""
        from foundation.generation import generate
        from foundation.models import load_causal_lm, load_tokenizer

        rows = self.prompts(prompt_set)
        convs = [r["messages"] for r in rows]
        for name in policies:
            model = self.a.policy if name == "sft" else str(self.out / name)
            path = self.out / f"{prompt_set}_{name}.jsonl"
            if path.is_file() and name not in self.a.redo:
                continue
            if name != "sft" and not (self.out / name / "summary.json").is_file():
                continue
            lm, tok = load_causal_lm(model), load_tokenizer(model)
            gens = generate(lm, tok, convs, max_new_tokens=self.a.new_tokens, temperature=0.0, batch_size=self.a.gen_batch)
            texts = [g.text for g in gens]
            scores = {k: self.score(k, convs, texts) for k in ("gold", self.proxies()[-1])}
            _write(path, [{"prompt": c, "response": t, "tokens": len(g.response_ids), "finished": g.finished,
                           **{k: v[i] for k, v in scores.items()}} for i, (c, t, g) in enumerate(zip(convs, texts, gens))])

    def final(self, prompt_sets: Sequence[str] = ("test",)) -> dict:
        """Each returned policy against the SFT model on ``prompt_sets`` (pooled when several): gold win rate, its
        length-controlled companion, the length strata, mean gold scores and lengths."""
        if not all((self.out / f"{s}_sft.jsonl").is_file() for s in prompt_sets):
            return {}
        sft = [r for s in prompt_sets for r in read_jsonl(self.out / f"{s}_sft.jsonl")]
        out = {"sft": {"gold_mean": sum(r["gold"] for r in sft) / len(sft), "tokens": sum(r["tokens"] for r in sft) / len(sft),
                       "n": len(sft)}}
        for name in self.POLICIES[1:]:
            paths = [self.out / f"{s}_{name}.jsonl" for s in prompt_sets]
            if not all(p.is_file() for p in paths):
                continue
            pol = [r for p in paths for r in read_jsonl(p)]
            if [r["prompt"] for r in pol] != [r["prompt"] for r in sft]:
                raise AssertionError(f"{name}'s answers and the SFT model's are not to the same prompts ({prompt_sets})")
            out[name] = self.compare(pol, sft)
        return out

    def compare(self, pol: list[dict], base: list[dict]) -> dict:
        """Answers ``pol`` against ``base`` (the same prompts, in order) by the gold: win rate, its length-controlled
        companion, the length strata, mean gold scores and lengths."""
        from alignment.evals import lcwr
        from alignment.evals.winrate import outcome, summarise

        wins = [outcome(p["gold"], s["gold"]) for p, s in zip(pol, base)]
        return {"gold_mean": sum(r["gold"] for r in pol) / len(pol), "tokens": sum(r["tokens"] for r in pol) / len(pol),
                "winrate_vs_sft": summarise(wins, seed=self.a.seed),
                "lc_winrate_vs_sft": lcwr.summarise(wins, [p["tokens"] for p in pol], [s["tokens"] for s in base],
                                                   seed=self.a.seed),
                "identical_answers": sum(p["response"] == s["response"] for p, s in zip(pol, base)),
                "length_strata": length_strata(wins, pol, base, seed=self.a.seed)}

    # -- 9. the length control: the SFT model made as short as each PPO policy -------------------
    def stage_length_control(self) -> None:
        """For each returned PPO policy, the EOS bias (``SamplingParams.eos_bias``) that makes the SFT model's greedy
        answers to the validation prompts as long, in tokens, as the policy's there (bisected, ``match_bias``: a
        decision, so validation prompts only), then the SFT model with that bias on the test and replication prompts,
        scored like every answer (``<set>_sft_eos_<policy>.jsonl``); the biases in ``length_control.json``."""
        from benchmarks.length_control import match_bias
        from foundation.generation import generate

        self.answer("validation")
        val = [r["messages"] for r in self.prompts("validation")]
        model, tok = self.policy()
        work = self.out / "length_control"
        work.mkdir(exist_ok=True)

        def answers(convs: list, b: float) -> list:
            return generate(model, tok, convs, max_new_tokens=self.a.new_tokens, temperature=0.0, batch_size=self.a.gen_batch,
                            eos_bias=b)

        def length_at(b: float) -> float:
            path = work / f"validation_eos_{b:+.4f}.json"
            if not path.is_file():
                gens = answers(val, b)
                path.write_text(json.dumps({"bias": b, "tokens": [len(g.response_ids) for g in gens]}))
            tokens = json.loads(path.read_text())["tokens"]
            return sum(tokens) / len(tokens)

        matched = {}
        for name in self.POLICIES[1:]:
            if not (self.out / f"validation_{name}.jsonl").is_file():
                continue
            target = read_jsonl(self.out / f"validation_{name}.jsonl")
            matched[name] = match_bias(length_at, sum(r["tokens"] for r in target) / len(target))
            for prompt_set in ("test", "replication"):
                path = self.out / f"{prompt_set}_sft_eos_{name}.jsonl"
                if path.is_file() or not (self.out / "prompts" / f"{prompt_set}.jsonl").is_file():
                    continue
                convs = [r["messages"] for r in self.prompts(prompt_set)]
                gens = answers(convs, matched[name]["bias"])
                texts = [g.text for g in gens]
                scores = {k: self.score(k, convs, texts) for k in ("gold", self.proxies()[-1])}
                _write(path, [{"prompt": c, "response": t, "tokens": len(g.response_ids), "finished": g.finished,
                               **{k: v[i] for k, v in scores.items()}} for i, (c, t, g) in enumerate(zip(convs, texts, gens))])
        (self.out / "length_control.json").write_text(json.dumps(matched, indent=1) + "\n")

    def length_control(self) -> dict:
        """Each PPO policy against the SFT model made as short (``stage_length_control``), on the test prompts, the
        replication prompts and both pooled."""
        matched = json.loads((self.out / "length_control.json").read_text())
        out = {}
        for name, m in matched.items():
            got: dict[str, Any] = {"match": m}
            sets = [s for s in ("test", "replication") if (self.out / f"{s}_sft_eos_{name}.jsonl").is_file()]
            for label, chosen in [*((s, (s,)) for s in sets), *((("pooled", tuple(sets)),) if len(sets) > 1 else ())]:
                pol = [r for s in chosen for r in read_jsonl(self.out / f"{s}_{name}.jsonl")]
                base = [r for s in chosen for r in read_jsonl(self.out / f"{s}_sft_eos_{name}.jsonl")]
                if [r["prompt"] for r in pol] != [r["prompt"] for r in base]:
                    raise AssertionError(f"{name} and its length-matched SFT answers are not to the same prompts ({chosen})")
                got[label] = {**self.compare(pol, base), "baseline_tokens": sum(r["tokens"] for r in base) / len(base)}
            out[name] = got
        return out

    # -- 8. replication on the prompts no stage read ----------------------------------------
    def stage_replication(self) -> None:
        """The final comparison again on the usable prompts that no stage drew (the rest of the seeded list the four
        sets were cut from): a second test set, larger than the first, read by no decision. Checks that the list
        re-drawn now reproduces the stored sets in order, so the rest is exactly what no stage read."""
        from reward.gold import prompt_key

        path = self.out / "prompts" / "replication.jsonl"
        if not path.is_file():
            kept, _, _ = self.usable_prompts()
            used = [prompt_key(r["messages"]) for s in ("test", "validation", "fresh", "train") for r in self.prompts(s)]
            if [prompt_key(r.messages) for r in kept[:len(used)]] != used:
                raise AssertionError("the usable prompts re-drawn now do not reproduce the stored prompt sets; the rest "
                                     "would not be the prompts no stage read (other data or settings than the prompts stage's)")
            rest = kept[len(used):]
            if self.a.replication_prompts is not None:
                rest = rest[:self.a.replication_prompts]
            if not rest:
                raise ValueError(f"no usable prompts left beyond the {len(used)} the four sets took")
            _write(path, [r.to_dict() for r in rest])
        self.answer("replication")

    # -- what --state keeps of each finished stage -------------------------------------------
    def kept(self, stage: str) -> tuple[list[str], list[str]]:
        """(files, models) of ``stage`` that later stages or the results read, relative to ``--out``."""
        if stage == "prompts":
            return [f"prompts/{p.name}" for p in sorted((self.out / "prompts").iterdir())], []
        if stage == "samples":
            return ["samples.jsonl"], []
        if stage == "proxies":  # each proxy is also kept as soon as it is trained
            return ["pairs.jsonl", *[f"{p}/rm_helpful/summary.json" for p in self.proxies()]], [
                f"{p}/rm_helpful/model" for p in self.proxies()]
        if stage in ("agreement", "bon"):
            return [f"{stage}.jsonl"], []
        if stage == "ppo":
            runs = [n for n in ("ppo_proxy", "ppo_oracle") if (self.out / n / "summary.json").is_file()]
            return [f"{n}/{f}" for n in runs for f in ("summary.json", "metrics.jsonl")], [f"{n}/model" for n in runs]
        if stage == "replication":
            return ["prompts/replication.jsonl", *[p.name for p in sorted(self.out.glob("replication_*.jsonl"))]], []
        if stage == "ppo_seeds":
            runs = [n for kind in KINDS for s, n in self.seed_runs(kind).items()
                    if s != self.a.seed and (self.out / n / "summary.json").is_file()]
            answers = [p.name for n in runs for s in ("test", "replication") for p in [self.out / f"{s}_{n}.jsonl"]
                       if p.is_file()]
            files = [f"{n}/{f}" for n in runs for f in ("summary.json", "metrics.jsonl")]
            return [*files, *answers], [f"{n}/model" for n in runs]
        if stage == "length_control":
            return ["length_control.json", *[p.name for p in sorted(self.out.glob("validation_*.jsonl"))],
                    *[p.name for p in sorted(self.out.glob("*_sft_eos_*.jsonl"))]], []
        return [p.name for p in sorted(self.out.glob("test_*.jsonl"))], []

    # -- results -------------------------------------------------------------------------------
    def results(self) -> dict:
        res: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.a).items()},
                               "prompts": json.loads((self.out / "prompts" / "manifest.json").read_text())
                               if (self.out / "prompts" / "manifest.json").is_file() else None}
        from reward.gold import load_card

        res["gold"] = {k: v for k, v in load_card(self.a.gold.split(":", 1)[1]).items() if k != "prompt_keys"}
        if (self.out / "agreement.jsonl").is_file():
            res["agreement"] = self.agreement()
        if (self.out / "bon.jsonl").is_file():
            res["bon"] = self.bon()
        res["ppo"] = self.ppo()
        res["final"] = self.final()
        if (self.out / "replication_sft.jsonl").is_file():
            rep = self.prompts("replication")
            res["replication"] = {"prompts": {"n": len(rep), "safety": sum(r.get("category") == "safety" for r in rep)},
                                  "alone": self.final(("replication",)), "pooled_with_test": self.final(("test", "replication"))}
        if (self.out / "length_control.json").is_file():
            res["length_control"] = self.length_control()
        if len(self.seed_runs()) > 1:
            res["ppo_seeds"] = self.ppo_seeds()
        if len(self.seed_runs("oracle")) > 1:
            res["ppo_oracle_seeds"] = self.ppo_seeds("oracle")
        res["proxy_training"] = {}
        for name in self.proxies():
            s = self.out / name / "rm_helpful" / "summary.json"
            if s.is_file():
                d = json.loads(s.read_text())
                res["proxy_training"][name] = {k: d.get(k) for k in ("held_out_accuracy", "held_out_pairs", "train_seconds")}
        res["targets"] = self.targets(res)
        res["stage_seconds"] = self.times
        return res

    def targets(self, res: dict) -> dict:
        t: dict[str, Any] = {}
        top = self.proxies()[-1]
        ag = (res.get("agreement") or {}).get(top)
        if ag:
            t["agreement"] = {"value": ag["agreement"], "ci95": ag["ci95"], "n": ag["n"],
                              "met": ag["agreement"] >= TARGETS["agreement"] and ag["ci95"][0] >= TARGETS["agreement_ci_low"],
                              "target": ">= 70%, CI low >= 65%"}
        if res.get("bon"):
            r = res["bon"]["ratio_best_proxy_to_gold"]
            t["bon"] = {"value": r, "met": r is not None and r >= TARGETS["bon_ratio"],
                        "target": "best-of-16 by the largest proxy gains >= 50% of best-of-16 by the gold"}
        rep = res.get("replication") or {}
        for name, key in (("ppo_proxy", "ppo_winrate"), ("ppo_oracle", "oracle_winrate")):
            for suffix, final, where in (("", res.get("final"), "test prompts"),
                                         ("_replication", rep.get("alone"), "the replication prompts (read after the test)"),
                                         ("_pooled", rep.get("pooled_with_test"), "test + replication prompts")):
                f = (final or {}).get(name)
                if f:
                    w, lc = f["winrate_vs_sft"], f["lc_winrate_vs_sft"]
                    t[name + suffix] = {
                        "winrate": w["win_rate"], "ci": [w["ci_low"], w["ci_high"]], "n": w["n"],
                        "lc_winrate": lc["lc_win_rate"], "lc_ci": [lc["ci_low"], lc["ci_high"]],
                        "met": w["win_rate"] >= TARGETS[key] and w["ci_low"] > 0.5 and lc["ci_low"] > 0.5,
                        "target": f">= {100 * TARGETS[key]:.0f}% on {where}, CI low > 50%, length-controlled too"}
        for kind, target in KINDS.items():
            got = res.get("ppo_seeds" if kind == "proxy" else f"ppo_{kind}_seeds") or {}
            if got.get("seeds"):
                t[f"ppo_{kind}_seeds"] = self.seed_target(got, TARGETS[target])
        return t

    @staticmethod
    def seed_target(got: dict, bar: float) -> dict:
        """The PPO target (win rate >= ``bar``, CI low > 50%, length-controlled too) in each seed of ``got``
        (``ppo_seeds()``), on its pooled prompt sets."""
        seeds, key = got["seeds"], got["prompt_sets"]

        def met(g: dict) -> bool:
            w, lc = g[key]["winrate_vs_sft"], g[key]["lc_winrate_vs_sft"]
            return w["win_rate"] >= bar and w["ci_low"] > 0.5 and lc["ci_low"] > 0.5

        return {
            "seeds": {s: {"winrate": g[key]["winrate_vs_sft"]["win_rate"], "n": g[key]["winrate_vs_sft"]["n"],
                          "ci": [g[key]["winrate_vs_sft"]["ci_low"], g[key]["winrate_vs_sft"]["ci_high"]],
                          "lc_winrate": g[key]["lc_winrate_vs_sft"]["lc_win_rate"],
                          "lc_ci": [g[key]["lc_winrate_vs_sft"]["ci_low"], g[key]["lc_winrate_vs_sft"]["ci_high"]],
                          "met": met(g)} for s, g in seeds.items()},
            "met": all(met(g) for g in seeds.values()),
            "target": f">= {100 * bar:.0f}% on the {key} prompts in every PPO seed, CI low > 50%, "
                      "length-controlled too"}


def plot(res: dict, results_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if res.get("bon"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for picker, pts in res["bon"]["curves"].items():
            x = [math.sqrt(p["kl"]) for p in pts]
            axes[0].plot(x, [p["gold_gain"] for p in pts], "o-", label=f"picked by {picker}")
            if picker != "gold":
                axes[1].plot(x, [p["proxy"] - pts[0]["proxy"] for p in pts], "o-", label=picker)
        for name, pts in (res["bon"].get("controls") or {}).items():
            axes[0].plot([math.sqrt(p["kl"]) for p in pts], [p["gold_gain"] for p in pts], "x:", color="grey",
                         label=f"control: the {name} answer")
        axes[0].set(xlabel="sqrt(KL_bon)", ylabel="gold score gain over n=1", title="Best-of-n: gold score of the pick")
        axes[1].set(xlabel="sqrt(KL_bon)", ylabel="proxy score gain over n=1", title="Best-of-n: the proxy's own score")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results_dir / "rlhf_core_bon.png", dpi=110)
        plt.close(fig)
    if res.get("ppo"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, name in zip(axes, ("ppo_proxy", "ppo_oracle")):
            run = res["ppo"].get(name)
            if not run:
                continue
            c = run["curve"]
            x = [p["sqrt_kl"] for p in c]
            ax.plot(x, [p["gold"] - c[0]["gold"] for p in c], "o-", label="gold (validation)")
            ax.plot(x, [p["proxy"] - c[0]["proxy"] for p in c], "s--", label="proxy (validation)")
            ax.set(xlabel="sqrt(KL to the start)", ylabel="score gain over the start",
                   title=f"{name}: returned {run['summary'].get('returned')}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results_dir / "rlhf_core_ppo.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import GOLD_PACKS, RESULTS, ensure_gold

    p = argparse.ArgumentParser(prog="python -m benchmarks rlhf_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "bench-rlhf-core"))
    p.add_argument("--data", type=Path, default=SHARED, help="folder with hh-rlhf/ and instruct/ (../shared/data)")
    p.add_argument("--gold", default="gold:hh-helpful-smollm2",
                   help="the gold reward model: from the cache, else unpacked from --state, else built (`align gold build`)")
    p.add_argument("--gold-data", default="helpful-base", help="HH-RLHF subsets the gold is built on, when it has to be")
    p.add_argument("--gold-pairs", type=int, default=2000)
    p.add_argument("--gold-packs", default=str(GOLD_PACKS),
                   help="a tracked folder of packed golds (`align gold pack`): the gold is unpacked from it when the cache "
                        "lacks it, and packed into it once built; '' for none")
    p.add_argument("--state", default=str(REPO / "benchmarks" / "state" / "rlhf_core"),
                   help="a tracked folder keeping each finished stage's outputs and packed models (State); '' for none")
    p.add_argument("--policy", default=SFT, help="the SFT policy (and the base of the proxies)")
    p.add_argument("--gold-model", default=SFT, help="base model of the gold, when it has to be built")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES + EXTRA_STAGES)} "
                   "(the last only when named)")
    p.add_argument("--ppo-seeds", default="", help="the ppo_seeds stage: PPO against the largest proxy again with these "
                   "seeds (comma-separated, other than --seed)")
    p.add_argument("--oracle-seeds", default="", help="the ppo_seeds stage: oracle PPO (against the gold) again with these "
                   "seeds (comma-separated, other than --seed)")
    p.add_argument("--redo", default="", help="comma-separated stages or runs (proxy_250, ppo_proxy, ...) to run again")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-prompts", type=int, default=300)
    p.add_argument("--fresh-prompts", type=int, default=300)
    p.add_argument("--val-prompts", type=int, default=64)
    p.add_argument("--test-prompts", type=int, default=128)
    p.add_argument("--replication-prompts", type=int, default=None,
                   help="the replication stage's prompts: the first N of the usable prompts no other set took (default all)")
    p.add_argument("--max-prompt-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=8, help="answers per train prompt")
    p.add_argument("--pairs-per-prompt", type=int, default=8)
    p.add_argument("--sample-chunk", type=int, default=25, help="train prompts per saved chunk of the samples stage")
    p.add_argument("--pairs", default="250,1000,2300",
                   help="nested proxy training sizes (the last is the largest proxy; at most the labelled pairs: "
                        "train prompts x pairs per prompt, less ties and identical answers)")
    p.add_argument("--bon", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--rm-lr", type=float, default=3e-4)
    p.add_argument("--rm-max-length", type=int, default=192)
    p.add_argument("--ppo-iterations", type=int, default=100)
    p.add_argument("--ppo-lr", type=float, default=1e-4)
    p.add_argument("--ppo-critic-lr", type=float, default=1e-4)
    p.add_argument("--ppo-rollout", type=int, default=16)
    p.add_argument("--ppo-minibatch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--ppo-kl", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--proxy-layers", type=int, default=10, help="proxies: LoRA in the top N layers (0 = all)")
    p.add_argument("--ppo-layers", type=int, default=10, help="PPO policy and critic: LoRA in the top N layers (0 = all)")
    p.add_argument("--gold-layers", type=int, default=0,
                   help="the gold, when built here: LoRA in the top N layers (0 = all; top 6 at 128 tokens learned nothing)")
    p.add_argument("--gold-max-length", type=int, default=320, help="the gold, when built here: tokens per sequence")
    p.add_argument("--results", type=Path, default=None, help="where the JSON's plots and history go (benchmarks/results)")
    a = p.parse_args(argv)
    a.pairs = [int(x) for x in a.pairs.split(",")]
    a.redo = [x for x in a.redo.split(",") if x]
    for flag, kind in (("ppo_seeds", "proxy"), ("oracle_seeds", "oracle")):
        opt = "--" + flag.replace("_", "-")
        try:
            seeds = [int(x) for x in getattr(a, flag).split(",") if x.strip()]
        except ValueError:
            p.error(f"{opt} takes comma-separated integers (got {getattr(a, flag)!r})")
        if a.seed in seeds or len(set(seeds)) != len(seeds):
            p.error(f"{opt} {seeds}: each once, and not --seed ({a.seed}), whose run is ppo_{kind}")
        setattr(a, flag, seeds)
    if a.replication_prompts is not None and a.replication_prompts < 1:
        p.error(f"--replication-prompts must be >= 1 (got {a.replication_prompts}); leave it out for all the rest")
    if not (a.data / "hh-rlhf").is_dir():
        return {"skipped": f"{a.data}/hh-rlhf not found (../shared/data)"}
    gold_name = a.gold.split(":", 1)[1] if a.gold.startswith("gold:") else None
    from reward import gold as gold_mod

    t_all = time.time()
    state_root = Path(a.state) if a.state else None
    packs = Path(a.gold_packs) if a.gold_packs else None
    packed_gold = packs / gold_name if packs and gold_name else None
    if gold_name:
        got = ensure_gold(gold_name, packs)
        _log(f"the gold {gold_name}: {got}")
        if got == "missing":
            _log(f"building the gold {gold_name} on {a.gold_pairs} HH-RLHF pairs")
            gold_mod.build([str(a.data / "hh-rlhf" / s / "test.jsonl.gz") for s in a.gold_data.split(",")],
                           name=gold_name, pairs=a.gold_pairs, model=a.gold_model, max_length=a.gold_max_length,
                           layers=a.gold_layers or None)
    if packed_gold and not (packed_gold / "card.json").is_file():
        gold_mod.pack(gold_name, packed_gold)
    bench = Bench(a)
    state = bench.state = State(state_root, bench.out)
    for rel in state.restore():
        _log(f"restored from {state_root}: {rel}")
    done = {"prompts": "prompts/manifest.json", "samples": "samples.jsonl", "agreement": "agreement.jsonl", "bon": "bon.jsonl",
            "length_control": "length_control.json"}
    for stage in a.stages.split(","):
        if stage not in STAGES + EXTRA_STAGES:
            raise SystemExit(f"unknown stage {stage!r}; expected {', '.join(STAGES + EXTRA_STAGES)}")
        if stage in done and (bench.out / done[stage]).is_file() and stage not in a.redo:
            _log(f"{stage}: done before, skipped")
            continue
        _log(f"{stage}: start")
        t = time.time()
        getattr(bench, f"stage_{stage}")()
        state.keep(*bench.kept(stage))
        bench.times[stage] = round(time.time() - t, 1)
        _log(f"{stage}: {bench.times[stage] / 60:.1f} min")
    res = bench.results()
    res["seconds"] = round(time.time() - t_all, 1)
    results = a.results or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    plot(res, results)
    with (results / "rlhf_core_history.jsonl").open("a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "stages": a.stages, "settings": res["settings"],
                             "targets": res["targets"], "stage_seconds": bench.times}) + "\n")
    for name, t in res["targets"].items():
        _log(f"target {name}: {'met' if t['met'] else 'NOT met'} ({ {k: v for k, v in t.items() if k != 'target'} })")
    return res
