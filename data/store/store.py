"""The annotation store: users, the task queue with leases, labels, export and statistics.

Its parts, each read top to bottom: :mod:`data.store.base` (connection, transactions, the audit log,
users), :mod:`data.store.queue` (queueing, leases, labels, closing rounds, progress), this module (export
and statistics; the class users import), :mod:`data.store.values` (what the methods return),
:mod:`data.store.label` (a label's fields), :mod:`data.store.tables` (tables and migrations).

See :mod:`data.store` for the API overview. Transactions:

- SQLite: every write runs in ``BEGIN IMMEDIATE`` (one writer at a time, readers never blocked in
  WAL mode), so "read the queue, lease a task" is atomic. ``PRAGMA synchronous=FULL`` (default)
  fsyncs the WAL at every commit: a committed label survives a killed process *and* a power cut;
  ``NORMAL`` survives a killed process but may lose the last commits on power loss.
- PostgreSQL: READ COMMITTED; a lease locks its task row (``FOR UPDATE SKIP LOCKED``, so
  concurrent annotators pass over each other's candidates) and re-counts the task's live leases in
  a new statement after the lock, so two annotators can never hold the last slot of a task.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from sqlalchemy import func, select

from data.store.export import POLICIES, ExportPlan, LabelRecord, Policy, plan_export
from data.store.label import AnnotationError, Judgement
from data.store.rounds import RoundStore
from data.store.stats import summarize
from data.store.tables import Assignment, Export, Label, Task, User
from data.store.values import (
    DEFAULT_EXPORT_DIR,
    ExportResult,
)

log = logging.getLogger(__name__)


class AnnotationStore(RoundStore):
    """The annotation database. Thread-safe: every method opens its own short transaction.

    Its parts: connection, transactions and users (:class:`data.store.base.StoreBase`), the task queue and
    labels (:class:`data.store.queue.QueueStore`), and here export and statistics."""

    # -- export -----------------------------------------------------------------------------------

    def label_records(self, round: int | None = None, *, texts: bool = True) -> list[LabelRecord]:
        """Every label (of a round), joined with its task and annotator, ordered by task then label.
        ``texts=False`` leaves out the prompt and responses (statistics do not need them)."""
        text_cols = (Task.prompt, Task.response_a, Task.response_b, Task.meta) if texts else ()
        with self._tx(write=False) as s:
            q = (select(Label, Task.id, Task.uid, Task.round, Task.source_a, Task.source_b, Task.category, Task.labels_needed,
                        Task.labels_done, User.name, User.kind, *text_cols)
                 .join(Task, Task.id == Label.task_id).join(User, User.id == Label.user_id).order_by(Task.round, Task.seq,
                                                                                                     Label.id))
            if round is not None:
                q = q.where(Label.round == round)
            out = []
            for lab, tid, uid, rnd, src_a, src_b, cat, needed, done, name, kind, *rest in s.execute(q):
                prompt, a, b, meta = rest if texts else ([], "", "", {})
                out.append(LabelRecord(
                    **Judgement.of(lab).columns(), label_id=lab.id, task_id=tid, task_uid=uid, round=rnd,
                    prompt=prompt, response_a=a,
                    response_b=b, source_a=src_a, source_b=src_b, category=cat, labels_needed=needed,
                    labels_done=done, annotator=name,
                    annotator_kind=kind, swapped=lab.swapped, seconds=lab.seconds,
                    created_at=lab.created_at, task_meta=meta or {}))
            return out

    def comparisons(self, round: int, *, policy: Policy = "majority", complete_only: bool = False,
                    drop_both_bad: bool = False) -> ExportPlan:
        """The round's comparisons under a disagreement policy, in memory (see :func:`plan_export`)."""
        return plan_export(self.label_records(round), policy=policy, complete_only=complete_only, drop_both_bad=drop_both_bad)

    def export(self, round: int, out: str | Path | None = None, *, out_dir: str | Path = DEFAULT_EXPORT_DIR,
               policy: Policy = "majority", complete_only: bool = False, drop_both_bad: bool = False,
               by: str | None = None) -> ExportResult:
        """Write the round's comparisons (``data.schemas.Comparison`` JSONL, read by
        ``data.loaders.load_comparisons`` and the reward stage) as the round's next export version.

        ``out`` defaults to ``<out_dir>/round-<N>/comparisons-v<version>.jsonl``. No file is ever
        overwritten: an existing ``out`` is an error. Every export is recorded with its hash.
        """
        from data.loaders import write_jsonl

        if policy not in POLICIES:
            raise AnnotationError(f"unknown export policy {policy!r}; expected one of: {', '.join(POLICIES)}")
        plan = self.comparisons(round, policy=policy, complete_only=complete_only, drop_both_bad=drop_both_bad)
        if not plan.comparisons:
            raise AnnotationError(f"round {round}: nothing to export ({plan.tasks} labelled tasks, {plan.ties_dropped} ties, "
                                  f"{plan.incomplete_skipped} incomplete)")
        for _ in range(5):
            with self._tx() as s:
                version = (s.scalar(select(func.max(Export.version)).where(Export.round == round)) or 0) + 1
                path = Path(out) if out is not None else Path(out_dir) / f"round-{round}" / f"comparisons-v{version}.jsonl"
                if path.exists():
                    if out is not None:
                        raise FileExistsError(f"{path} exists; an export never overwrites a file (omit --out to write "
                                              f"version {version} of round {round} under {out_dir})")
                    continue  # a file left from another database: the next version
                rows = []
                for c in plan.comparisons:
                    d = c.to_dict()
                    d.setdefault("meta", {})["export"] = {"round": round, "version": version, "policy": policy}
                    rows.append(d)
                write_jsonl(path, rows)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                try:
                    s.add(Export(round=round, version=version, path=str(path), policy=policy, n_records=len(rows),
                                 sha256=digest, created_by=by, created_at=self.clock()))
                    self._event(s, "export", None, round=round, version=version, path=str(path), records=len(rows), by=by)
                    s.flush()
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            return ExportResult(path, round, version, policy, len(rows), plan.tasks, plan.ties_dropped,
                                plan.incomplete_skipped, digest)
        raise AnnotationError(f"round {round}: could not find a free export version under {out_dir}")

    def exports(self, round: int | None = None) -> list[dict]:
        with self._tx(write=False) as s:
            q = select(Export).order_by(Export.round, Export.version)
            if round is not None:
                q = q.where(Export.round == round)
            return [{"round": e.round, "version": e.version, "path": e.path, "policy": e.policy, "records": e.n_records,
                     "sha256": e.sha256, "by": e.created_by, "created_at": e.created_at.isoformat()} for e in s.scalars(q)]

    # -- statistics -------------------------------------------------------------------------------

    def stats(self, round: int | None = None) -> dict:
        """Progress, per-annotator counts and speed, strength and safety-bin distributions, position
        bias, and agreement on overlapping tasks (JSON-ready)."""
        records = self.label_records(round, texts=False)
        now = self.clock()
        with self._tx(write=False) as s:
            tq = select(func.count(Task.id), func.coalesce(func.sum(Task.labels_needed), 0),
                        func.coalesce(func.sum(Task.labels_done), 0))
            cq = select(func.count(Task.id)).where(Task.labels_done >= Task.labels_needed)
            oq = select(func.count(Task.id)).where(Task.labels_needed > 1)
            sq = (select(User.name, User.kind, func.count(Assignment.id)).join(User, User.id == Assignment.user_id)
                  .join(Task, Task.id == Assignment.task_id).where(Assignment.status == "skipped").group_by(User.name, User.kind))
            if round is not None:
                tq, cq, oq, sq = (q.where(Task.round == round) for q in (tq, cq, oq, sq))
            n_tasks, needed, done = s.execute(tq).one()
            complete, overlap_tasks = s.scalar(cq), s.scalar(oq)
            skips = {(name, kind): n for name, kind, n in s.execute(sq)}
        out = summarize(records, round=round, now=now, tasks=n_tasks, labels_needed=int(needed), labels_done=int(done),
                        missing=self.missing_labels(round), complete_tasks=complete, overlap_tasks=overlap_tasks, skips=skips)
        out["leases"] = self.leases(round)  # who holds which task since when
        return out
