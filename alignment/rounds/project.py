"""A project on disk: ``round.yaml``, the prompt pool and held-out prompts, one ``manifest.json`` per round."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from foundation.config import ConfigError, load_config, save_config
from alignment.rounds.config import FIRST_ROUND, FIRST_ROUND_SAMPLED, LATER_ROUND, RoundConfig

log = logging.getLogger("alignment.rounds")

# ---------------------------------------------------------------------------------------------
# the registry: one manifest per round


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def sha256(path: str | Path) -> str | None:
    from foundation.runs import file_sha256

    p = Path(path)
    return file_sha256(p) if p.is_file() else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


_HELD: dict[Path, tuple[Any, int]] = {}  # project folder -> (open lock file, depth) held by this process


class ProjectBusy(RuntimeError):
    """Another process is running steps of this project."""


@contextlib.contextmanager
def project_lock(p: Project) -> Iterator[None]:
    """Hold ``<project>/.lock`` (an exclusive ``flock``) while steps run: two ``align round run`` on one project would
    sample, label and train over each other. Re-entrant within a process; the lock goes with the process that holds it,
    so a killed run leaves nothing to clean up."""
    key = p.dir.resolve()
    if key in _HELD:
        fh, depth = _HELD[key]
        _HELD[key] = (fh, depth + 1)
        try:
            yield
        finally:
            fh, depth = _HELD[key]
            _HELD[key] = (fh, depth - 1)
        return
    import fcntl

    p.dir.mkdir(parents=True, exist_ok=True)
    fh = open(p.dir / ".lock", "a+")  # noqa: SIM115 - held across the yield
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise ProjectBusy(f"{p.dir}: {holder} is running this project's steps (lock {p.dir / '.lock'}); wait for it "
                          f"to finish, or stop it, then run again") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {now()}\n")
    fh.flush()
    _HELD[key] = (fh, 1)
    try:
        yield
    finally:
        del _HELD[key]
        fh.close()  # closing releases the flock


def lock_holder(p: Project) -> str | None:
    """Who holds ``p``'s lock ("pid N since T"), or None when no process runs its steps."""
    if p.dir.resolve() in _HELD:
        return f"pid {os.getpid()} (this process)"
    path = p.dir / ".lock"
    if not path.is_file():
        return None
    import fcntl

    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


class Project:
    """``runs/<project>/``: ``round.yaml`` (the resolved config), ``round-<N>/manifest.json``, the store."""

    def __init__(self, root: str | Path, name: str):
        self.dir = Path(root) / name
        self.config_path = self.dir / "round.yaml"
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.dir}: no project here (create it with `align round init --project {name}`)")
        self.cfg: RoundConfig = load_config(RoundConfig, self.config_path, [], stage="round")

    @staticmethod
    def init(cfg: RoundConfig) -> Project:
        d = Path(cfg.root) / cfg.project
        if (d / "round.yaml").exists():
            raise FileExistsError(f"{d} already holds a project; `align round run --project {cfg.project}` continues it")
        heldout, validation, pool = Project.split_prompts(cfg)  # bad sources fail before anything is written
        d.mkdir(parents=True, exist_ok=True)
        from data.loaders import write_jsonl

        write_jsonl(d / "heldout.jsonl", [r.to_dict() for r in heldout], overwrite=True)
        write_jsonl(d / "validation.jsonl", [r.to_dict() for r in validation], overwrite=True)
        write_jsonl(d / "prompt_pool.jsonl", [r.to_dict() for r in pool], overwrite=True)
        save_config(cfg, d / "round.yaml", stage="round")
        return Project(cfg.root, cfg.project)

    @staticmethod
    def split_prompts(cfg: RoundConfig) -> tuple[list, list, list]:
        """(test prompts, validation prompts, the pool every stage samples from) out of ``sample.prompts``
        (``data.splits``: the test set for reported numbers only, validation for decisions)."""
        from data.heldout import split_three
        from data.loaders import load_prompts

        pool = [p for src in cfg.sample.prompts for p in load_prompts(src)]
        if "gold_rm" in cfg.eval.judges and cfg.eval.gold_model.startswith("gold:"):
            pool = Project.without_gold_prompts(pool, cfg.eval.gold_model.split(":", 1)[1])
        try:
            return split_three(pool, cfg.eval.heldout, cfg.eval.validation, cfg.sample.safety_share, seed=cfg.seed)
        except ValueError as exc:
            key = "eval.validation" if str(exc).startswith("eval.validation") else "eval.heldout"
            raise ConfigError(key, str(exc), show_key=False) from None

    @staticmethod
    def without_gold_prompts(pool: list, name: str) -> list:
        """``pool`` less every prompt the gold reward model ``name`` trained or was measured on (by its first
        user turn, :func:`reward.gold_cache.prompt_key`): a judge must not grade answers to prompts it learned."""
        from reward.gold_cache import gold_prompt_keys, prompt_key

        try:
            keys = gold_prompt_keys(name)
        except FileNotFoundError as exc:
            raise ConfigError("eval.gold_model", f"the gold_rm judge needs its gold model, to keep its prompts out of the "
                                                 f"project: {exc}", show_key=False) from None
        kept = [p for p in pool if prompt_key(p.messages) not in keys]
        if len(kept) < len(pool):
            log.info("left out %d of %d prompts: the gold model %r trained or was measured on them",
                     len(pool) - len(kept), len(pool), name)
        return kept

    # -- prompts: test (reported numbers only), validation (decisions) and the pool (everything else)
    @property
    def heldout_path(self) -> Path:
        """The test prompts (called held-out since the first release)."""
        return self.dir / "heldout.jsonl"

    @property
    def validation_path(self) -> Path:
        return self.dir / "validation.jsonl"

    def validation(self) -> list:
        """The validation prompts ([] for a project created before they existed)."""
        from data.loaders import load_prompts

        path = self.validation_path
        return load_prompts(str(path)) if path.is_file() and path.stat().st_size else []

    @property
    def pool_path(self) -> Path:
        return self.dir / "prompt_pool.jsonl"

    def heldout(self) -> list:
        from data.loaders import load_prompts

        return load_prompts(str(self.heldout_path)) if self.heldout_path.stat().st_size else []

    def pool(self) -> list:
        from data.loaders import load_prompts

        return load_prompts(str(self.pool_path))

    # -- paths and manifests
    def round_dir(self, n: int) -> Path:
        return self.dir / f"round-{n}"

    def manifest_path(self, n: int) -> Path:
        return self.round_dir(n) / "manifest.json"

    def manifest(self, n: int) -> dict:
        p = self.manifest_path(n)
        if p.is_file():
            return json.loads(p.read_text())
        return {"round": n, "method": self.cfg.method(n), "created_at": now(),
                "config_sha256": sha256(self.config_path), "steps": {}}

    def save_manifest(self, n: int, m: dict) -> None:
        self.round_dir(n).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path(n), m)

    def recorded_eval_dtypes(self) -> dict[int, str]:
        """The dtype each finished eval step ran in, by round (``float32`` for steps from before they recorded it)."""
        out = {}
        for n in self.rounds():
            step = self.manifest(n)["steps"].get("eval") or {}
            if step.get("status") == "done":
                out[n] = (step.get("outputs") or {}).get("dtype", "float32")
        return out

    def eval_dtype(self) -> str:
        """The ``eval.dtype`` setting this project's evaluations run in (``foundation.precision.inference_precision``).
        ``auto`` resolves by the machine (bf16 on a CPU with native bf16, fp32 on other CPUs), so a project whose
        evaluations already ran keeps theirs: ``auto`` means the dtype of its first finished eval step, and every round,
        rm_before and the benchmarks that reuse a round's answers stay in one dtype, whichever code or machine resumes
        the project. An explicit ``float32`` / ``bfloat16`` is used as given (the eval step warns when it differs from
        an earlier round's)."""
        setting = self.cfg.eval.dtype
        if setting != "auto":
            return setting
        recorded = self.recorded_eval_dtypes()
        if not recorded:
            return "auto"
        first = min(recorded)
        if recorded[first] == "bfloat16":  # e.g. evaluated on a GPU or a CPU with native bf16, resumed on one without
            from foundation.precision import resolve_inference_dtype

            try:
                resolve_inference_dtype("bfloat16")
            except ValueError as exc:
                raise ValueError(f"{self.dir}: its evaluations ran in bfloat16 (round {first}'s eval) and this machine cannot "
                                 f"continue in it ({exc}). To evaluate here in fp32, set `eval: dtype: float32` in "
                                 f"{self.config_path} (its rounds' stored results then mix dtypes; the eval step says "
                                 "which)") from None
        return recorded[first]

    def rounds(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.dir.glob("round-*") if (p / "manifest.json").is_file())

    def steps(self, n: int) -> tuple[str, ...]:
        if n > 1:
            return LATER_ROUND
        return FIRST_ROUND_SAMPLED if self.cfg.sample.first_round else FIRST_ROUND

    def pending(self, n: int) -> list[str]:
        done = self.manifest(n)["steps"]
        return [s for s in self.steps(n) if done.get(s, {}).get("status") != "done"]

    def root_flag(self) -> str:
        """`` --root R`` for commands a user copies, when the project is not under ``runs/``."""
        return "" if self.dir.parent == Path("runs") else f" --root {self.dir.parent}"

    def db_url(self) -> str:
        return self.cfg.annotation.db or f"sqlite:///{self.dir / 'annotations.db'}"

    # -- models of earlier rounds
    def sft_model(self) -> str:
        return str(self.round_dir(1) / "sft")

    def policy_of(self, n: int) -> str:
        return str(self.round_dir(n) / "policy")

    def rm_dir(self, name: str, upto: int) -> Path:
        """The latest reward model ``name`` (rm_helpful, rm_safety) trained in a round <= ``upto``."""
        trained = self.trained_rm(name, upto)
        return trained[1] if trained else self.round_dir(upto) / name

    def trained_rm(self, name: str, upto: int) -> tuple[int, Path] | None:
        """(round, folder) of the latest reward model ``name`` trained in a round <= ``upto``; None if none was."""
        for n in range(upto, 0, -1):
            step = self.manifest(n)["steps"].get(name, {})
            if step.get("status") == "done" and not step.get("outputs", {}).get("skipped"):
                return n, self.round_dir(n) / name
        return None

    def current_policy(self, before: int | None = None) -> str:
        """The latest promoted policy of a round before ``before`` (all rounds when None), else the SFT model."""
        for n in sorted(self.rounds(), reverse=True):
            if before is not None and n >= before:
                continue
            promote = self.manifest(n)["steps"].get("promote", {})
            if promote.get("outputs", {}).get("promoted"):
                return self.policy_of(n)
        return self.sft_model()

    def comparison_files(self, upto: int) -> list[str]:
        """Exports of rounds 1..upto (what the reward models of round ``upto`` add to ``comparisons``)."""
        files = []
        for n in range(1, upto + 1):
            exp = self.manifest(n)["steps"].get("export", {})
            if exp.get("status") == "done":
                files.append(exp["outputs"]["path"])
        return files


# ---------------------------------------------------------------------------------------------
