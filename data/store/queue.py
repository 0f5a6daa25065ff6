"""The annotation store's task queue: queueing pairs, leases, labels (submit, skip, undo, change), closing
rounds, simulated annotators and progress. The transaction rules are in :mod:`data.store.store`.

Length (~460 lines): leasing, labelling and counting share one transaction discipline (which row is locked,
which count is exact when) and are read together.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from data.errors import DataError
from data.store.base import StoreBase
from data.store.label import AnnotationError, Judgement
from data.store.pairs import MAX_RESPONSE_BYTES, TaskSpec, overlap_labels, parse_task, read_tasks
from data.store.tables import Assignment, Event, Label, Task, User
from data.store.values import (
    LeasedTask,
    LeaseLost,
    Progress,
    RecentLabel,
    SimulatedAnnotator,
    SubmitResult,
)

log = logging.getLogger(__name__)


class QueueStore(StoreBase):
    """The task queue and labels (the second layer of :class:`AnnotationStore`)."""

    # -- queue ------------------------------------------------------------------------------------

    def queue(self, round: int, tasks: Iterable[TaskSpec | dict], *, labels: int = 1, overlap: float = 0.0,
              overlap_labels: int = 3, seed: int = 0, where: Callable[[int], str] | None = None,
              max_response_bytes: int | None = MAX_RESPONSE_BYTES) -> int:
        """Add tasks to a round (all or nothing). Each needs ``labels`` labels, except a fraction
        ``overlap`` of them that need ``overlap_labels`` (for agreement statistics), or what the
        task itself says. A task id already queued in the round is an error. Rows (dicts) are
        validated: a response over ``max_response_bytes``, a NUL character or a NaN is refused.
        Returns the count."""
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise AnnotationError(f"round must be an integer >= 0, got {round!r}")
        specs: list[TaskSpec] = []
        for i, t in enumerate(tasks):
            try:
                specs.append(t if isinstance(t, TaskSpec) else parse_task(t, max_bytes=max_response_bytes))
            except DataError as exc:
                raise exc.located(line=i + 1) from None
        if not specs:
            raise AnnotationError("no tasks to queue")
        seen: dict[str, int] = {}
        for i, t in enumerate(specs):
            if t.uid in seen:
                raise DataError(f"duplicate task id {t.uid!r} (also task {seen[t.uid] + 1})", key="id").located(line=i + 1)
            seen[t.uid] = i
        needed = overlap_labels_fn(specs, labels, overlap, overlap_labels, seed)
        now = self.clock()

        def run() -> int:
            with self._tx() as s:
                uids = [t.uid for t in specs]
                existing: set[str] = set()
                for start in range(0, len(uids), 500):
                    existing |= set(s.scalars(select(Task.uid).where(Task.round == round, Task.uid.in_(uids[start:start + 500]))))
                for i, t in enumerate(specs):
                    if t.uid in existing:
                        loc = where(i) if where else f"task {i + 1}"
                        raise AnnotationError(f"{loc}: task id {t.uid!r} is already queued in round {round}; nothing was queued")
                seq0 = (s.scalar(select(func.max(Task.seq)).where(Task.round == round)) or 0) + 1
                s.add_all(Task(round=round, uid=t.uid, seq=seq0 + i, prompt=t.prompt, response_a=t.response_a,
                               response_b=t.response_b, source_a=t.source_a, source_b=t.source_b, category=t.category,
                               labels_needed=needed[i], labels_done=0, meta=t.meta, created_at=now)
                          for i, t in enumerate(specs))
                self._event(s, "queue", None, round=round, tasks=len(specs), labels=sum(needed))
            return len(specs)

        return self._retrying(run, attempts=2)

    def queue_file(self, round: int, path: str | Path, **kw: Any) -> int:
        """:meth:`queue` the tasks of a file (see :mod:`data.store.pairs`); errors name the file and line."""
        from data.loaders import read_rows

        lines = [lineno for lineno, _ in read_rows(path)]
        tasks = read_tasks(path, max_bytes=kw.get("max_response_bytes", MAX_RESPONSE_BYTES))
        return self.queue(round, tasks, where=lambda i: f"{path}:{lines[i]}", **kw)

    def rounds(self) -> list[int]:
        with self._tx(write=False) as s:
            return list(s.scalars(select(Task.round).distinct().order_by(Task.round)))

    # -- leases -----------------------------------------------------------------------------------

    def _view(self, a: Assignment, t: Task) -> LeasedTask:
        return LeasedTask(a.token, t.id, t.uid, t.round, t.prompt, t.response_a, t.response_b, t.source_a, t.source_b,
                          t.category, t.labels_needed, a.swapped, a.expires_at, t.meta or {})

    @staticmethod
    def _live_leases(task_id: Any, now: dt.datetime, except_user: int | None = None) -> Any:
        q = select(func.count(Assignment.id)).where(Assignment.task_id == task_id, Assignment.status == "leased",
                                                    Assignment.expires_at > now)
        if except_user is not None:
            q = q.where(Assignment.user_id != except_user)
        return q

    def lease_tasks(self, user: str, n: int = 1, *, round: int | None = None, hold: float | None = None) -> list[LeasedTask]:
        """Up to ``n`` tasks for ``user``: the live leases they hold first, then new ones in queue order.

        A task is offered only if it still needs labels once every live lease counts as one, and the
        user has neither labelled nor skipped it. A lease lasts ``lease_seconds``, or ``hold`` seconds when
        given (a page that renews it while open, :meth:`renew`); an expired one frees its slot for others.
        """
        if n < 1:
            raise AnnotationError(f"n must be >= 1, got {n}")
        if hold is not None and not hold > 0:
            raise AnnotationError(f"hold must be > 0 seconds, got {hold}")
        return self._retrying(lambda: self._lease(user, n, round, hold))

    def next_task(self, user: str, *, round: int | None = None, hold: float | None = None) -> LeasedTask | None:
        """The task ``user`` should label now (the one they already hold, or a new lease); None when done."""
        got = self.lease_tasks(user, 1, round=round, hold=hold)
        return got[0] if got else None

    def renew(self, token: str, user: str, hold: float) -> bool:
        """Keep a lease ``user`` still holds for ``hold`` more seconds (a page that is still open says so), but
        never past ``lease_seconds`` after it was issued: a task open on a page nobody works on goes back to
        the queue then. False when the lease is no longer theirs (labelled, skipped, released or expired)."""
        now = self.clock()
        with self._tx() as s:
            a = self._assignment(s, token, self._user(s, user, active=True))
            if a.status != "leased" or a.expires_at <= now:
                return False
            a.expires_at = max(a.expires_at, min(now + dt.timedelta(seconds=hold), a.issued_at + self.lease))
            return True

    def _lease(self, name: str, n: int, round: int | None, hold: float | None = None) -> list[LeasedTask]:
        now = self.clock()
        out: list[LeasedTask] = []
        with self._tx() as s:
            u = self._user(s, name, active=True)
            held = select(Assignment, Task).join(Task, Task.id == Assignment.task_id).where(
                Assignment.user_id == u.id, Assignment.status == "leased", Assignment.expires_at > now)
            if round is not None:
                held = held.where(Task.round == round)
            closed = self._closed(s)  # a closed round's tasks leave the queue: every submit would be refused
            if closed:
                held = held.where(Task.round.not_in(closed))
            for a, t in s.execute(held.order_by(Assignment.issued_at, Assignment.id).limit(n)):
                out.append(self._view(a, t))
            mine_done = exists().where(Assignment.task_id == Task.id, Assignment.user_id == u.id,
                                       Assignment.status.in_(("submitted", "skipped")))
            others = self._live_leases(Task.id, now, except_user=u.id).scalar_subquery()
            base = select(Task).where(Task.labels_done < Task.labels_needed, ~mine_done,
                                      Task.labels_done + others < Task.labels_needed)
            if round is not None:
                base = base.where(Task.round == round)
            if closed:
                base = base.where(Task.round.not_in(closed))
            passed: list[int] = [v.task_id for v in out]
            while len(out) < n:
                q = base.where(Task.id.not_in(passed)) if passed else base
                q = q.order_by(Task.round, Task.seq).limit(1)
                if self.dialect == "postgresql":
                    q = q.with_for_update(skip_locked=True, of=Task)
                t = s.scalars(q).first()
                if t is None:
                    break
                passed.append(t.id)
                if self.dialect == "postgresql":
                    # the candidate query read an older snapshot; now that the row is locked (and every
                    # lease of this task is created under that lock) a fresh count is exact
                    done, need = s.execute(select(Task.labels_done, Task.labels_needed).where(Task.id == t.id)).one()
                    if done + s.scalar(self._live_leases(t.id, now, except_user=u.id)) >= need:
                        continue
                a = s.scalars(select(Assignment).where(Assignment.task_id == t.id, Assignment.user_id == u.id)).first()
                if a is None:
                    a = Assignment(task_id=t.id, user_id=u.id)
                    s.add(a)
                a.token = secrets.token_urlsafe(18)
                a.swapped = secrets.randbelow(2) == 1
                span = self.lease if hold is None else min(self.lease, dt.timedelta(seconds=hold))
                a.status, a.issued_at, a.expires_at, a.finished_at = "leased", now, now + span, None
                s.flush()
                self._event(s, "lease", u, t.id, token=a.token, swapped=a.swapped)
                out.append(self._view(a, t))
        return out

    def release(self, token: str, user: str) -> None:
        """Give a leased task back without labelling it (it returns to the queue, this user included)."""
        with self._tx() as s:
            u = self._user(s, user)
            a = self._assignment(s, token, u)
            if a.status == "leased":
                a.status = "released"
                self._event(s, "release", u, a.task_id)

    @staticmethod
    def _assignment(s: Session, token: str, u: User) -> Assignment:
        a = s.scalars(select(Assignment).where(Assignment.token == token)).first()
        if a is None:
            raise AnnotationError("unknown or outdated task token (was the last label undone? reload the task)")
        if a.user_id != u.id:
            raise AnnotationError(f"this task is not assigned to {u.name!r}")
        return a

    def task_for(self, token: str, user: str) -> LeasedTask:
        """The task behind a lease token of ``user`` (whatever the lease's state)."""
        with self._tx(write=False) as s:
            a = self._assignment(s, token, self._user(s, user))
            return self._view(a, s.get_one(Task, a.task_id))

    # -- labels -----------------------------------------------------------------------------------

    def submit(self, token: str, user: str, judgement: Judgement | None = None, **fields: Any) -> SubmitResult:
        """Store a label for a leased task; returns only after the commit (durable). Submitting the
        same lease twice stores nothing new (``duplicate=True``), so a retried request is harmless.

        ``judgement`` (or its fields as keywords) is in TRUE identities; see :meth:`LeasedTask.true_choice`.
        """
        j = (judgement or Judgement(**fields)).validated()
        return self._retrying(lambda: self._submit(token, user, j))

    def _submit(self, token: str, name: str, j: Judgement) -> SubmitResult:
        now = self.clock()
        with self._tx() as s:
            u = self._user(s, name, active=True)
            a = self._assignment(s, token, u)
            t = s.scalars(select(Task).where(Task.id == a.task_id).with_for_update()).one()
            self._check_open(s, t.round)
            if a.status == "submitted":
                label = s.scalars(select(Label).where(Label.assignment_id == a.id)).one()
                return SubmitResult(label.id, t.uid, t.round, label.chosen, True)
            if a.status == "skipped":
                raise AnnotationError(f"task {t.uid!r} was skipped by {name!r}; it cannot be labelled now")
            lapsed = a.status == "released" or a.expires_at <= now
            if lapsed and t.labels_done + s.scalar(self._live_leases(t.id, now, except_user=u.id)) >= t.labels_needed:
                raise LeaseLost(f"the lease on task {t.uid!r} expired and the task went to other annotators; "
                                    "this label was not stored")
            label = Label(**j.columns(), assignment_id=a.id, task_id=t.id, user_id=u.id, round=t.round, swapped=a.swapped,
                          seconds=(now - a.issued_at).total_seconds(), created_at=now)
            s.add(label)
            a.status, a.finished_at = "submitted", now
            t.labels_done = t.labels_done + 1
            s.flush()
            self._event(s, "submit", u, t.id, label=label.id)
            return SubmitResult(label.id, t.uid, t.round, j.chosen, False)

    def skip(self, token: str, user: str, reason: str) -> None:
        """Skip a leased task with a reason: it goes back to the queue for others, never to this user."""
        reason = (reason or "").strip()
        if not reason:
            raise AnnotationError("a skip needs a reason")
        with self._tx() as s:
            u = self._user(s, user, active=True)
            a = self._assignment(s, token, u)
            if a.status == "submitted":
                raise AnnotationError("this task is already labelled; undo the label first")
            a.status, a.finished_at, a.skip_reason = "skipped", self.clock(), reason
            self._event(s, "skip", u, a.task_id, reason=reason)

    def undo_last(self, user: str, *, round: int | None = None) -> LeasedTask | None:
        """Delete ``user``'s most recent label and lease its task back to them (any other task they
        held returns to the queue). Returns that task, or None when they have no label. The label
        is kept in the audit log (``events``)."""
        return self._retrying(lambda: self._undo(user, round))

    def _undo(self, name: str, round: int | None) -> LeasedTask | None:
        now = self.clock()
        with self._tx() as s:
            u = self._user(s, name, active=True)
            q = select(Label).where(Label.user_id == u.id)
            if round is not None:
                q = q.where(Label.round == round)
            label = s.scalars(q.order_by(Label.created_at.desc(), Label.id.desc()).limit(1)).first()
            if label is None:
                return None
            t = s.scalars(select(Task).where(Task.id == label.task_id).with_for_update()).one()
            self._check_open(s, t.round)
            a = s.get_one(Assignment, label.assignment_id)
            s.execute(update(Assignment).where(Assignment.user_id == u.id, Assignment.status == "leased", Assignment.id != a.id)
                      .values(status="released"))
            detail = {"label": label.id, **Judgement.of(label).columns(), "created_at": label.created_at.isoformat()}
            s.execute(delete(Label).where(Label.id == label.id))
            t.labels_done = t.labels_done - 1
            a.token = secrets.token_urlsafe(18)  # a stale page cannot resubmit the undone label
            a.status, a.issued_at, a.expires_at, a.finished_at = "leased", now, now + self.lease, None
            s.flush()
            self._event(s, "undo", u, t.id, **detail)
            return self._view(a, t)

    # -- an annotator's recent labels; closing a round ----------------------------------------------

    def closed_rounds(self) -> set[int]:
        """Rounds an admin closed (``close_round``): their labels can no longer be submitted, undone or changed."""
        with self._tx(write=False) as s:
            return self._closed(s)

    @staticmethod
    def _closed(s: Session) -> set[int]:
        rows = s.execute(select(Event.action, Event.detail).where(Event.action.in_(("close-round", "reopen-round")))
                         .order_by(Event.id)).all()
        closed: set[int] = set()
        for action, detail in rows:
            r = int(detail["round"])
            closed.add(r) if action == "close-round" else closed.discard(r)
        return closed

    def close_round(self, round: int, *, by: str | None = None) -> None:
        """Close a round: no more labels, undos or changes in it (exports read a settled set)."""
        self._set_round_open(round, False, by)

    def reopen_round(self, round: int, *, by: str | None = None) -> None:
        self._set_round_open(round, True, by)

    def _set_round_open(self, round: int, open_: bool, by: str | None) -> None:
        if round not in self.rounds():
            raise AnnotationError(f"round {round} has no tasks")
        with self._tx() as s:
            self._event(s, "reopen-round" if open_ else "close-round", self._user(s, by) if by else None, round=round)

    def _check_open(self, s: Session, round: int) -> None:
        if round in self._closed(s):
            raise AnnotationError(f"round {round} is closed; its labels can no longer change (align annotate reopen-round)")

    def recent_labels(self, user: str, n: int = 10, *, round: int | None = None) -> list[RecentLabel]:
        """``user``'s ``n`` most recent labels, newest first."""
        closed = self.closed_rounds()
        with self._tx(write=False) as s:
            u = self._user(s, user)
            q = select(Label, Task).join(Task, Task.id == Label.task_id).where(Label.user_id == u.id)
            if round is not None:
                q = q.where(Label.round == round)
            rows = s.execute(q.order_by(Label.created_at.desc(), Label.id.desc()).limit(n)).all()
            return [RecentLabel(label.id, t.uid, t.round,
                                next((m["content"] for m in reversed(t.prompt) if m["role"] == "user"), ""),
                                label.chosen, label.strength, label.created_at, t.round not in closed) for label, t in rows]

    def label_task(self, user: str, label_id: int) -> tuple[LeasedTask, Judgement]:
        """One of ``user``'s labels with its task, as shown when it was made (same left/right order), for changing it."""
        with self._tx(write=False) as s:
            u = self._user(s, user)
            label = s.get(Label, label_id)
            if label is None or label.user_id != u.id:
                raise AnnotationError(f"label #{label_id} is not one of {user!r}'s labels")
            a = s.get_one(Assignment, label.assignment_id)
            view = self._view(a, s.get_one(Task, label.task_id))
            return view, Judgement.of(label)

    def change_label(self, user: str, label_id: int, judgement: Judgement | None = None, **fields: Any) -> SubmitResult:
        """Replace one of ``user``'s labels (TRUE identities) while its round is open; the old values go to the audit log."""
        j = (judgement or Judgement(**fields)).validated()

        def change() -> SubmitResult:
            with self._tx() as s:
                u = self._user(s, user, active=True)
                label = s.get(Label, label_id)
                if label is None or label.user_id != u.id:
                    raise AnnotationError(f"label #{label_id} is not one of {user!r}'s labels")
                t = s.get_one(Task, label.task_id)
                self._check_open(s, t.round)
                old = Judgement.of(label).columns()
                for name, value in j.columns().items():
                    setattr(label, name, value)
                self._event(s, "change-label", u, t.id, label=label.id, old=old)
                return SubmitResult(label.id, t.uid, t.round, j.chosen, False)

        return self._retrying(change)

    def label_with(self, annotator: SimulatedAnnotator, *, round: int | None = None, batch_size: int = 16,
                   limit: int | None = None) -> int:
        """Let a simulated annotator label tasks through the same leases and submits as people.

        Creates the user (kind ``simulated``) on first use; refuses a human user's name. Labels
        until the round has nothing left for it (or ``limit`` labels). Returns the number stored.
        """
        info = self.user(annotator.name)
        if info is None:
            self.add_user(annotator.name, kind="simulated")
        elif info.kind != "simulated":
            raise AnnotationError(f"{annotator.name!r} is a human user; "
                                  "a simulated annotator needs its own name (e.g. 'sim:...')")
        stored = 0
        while limit is None or stored < limit:
            n = batch_size if limit is None else min(batch_size, limit - stored)
            tasks = self.lease_tasks(annotator.name, n, round=round)
            if not tasks:
                break
            verdicts = list(annotator.judge(tasks))
            if len(verdicts) != len(tasks):
                raise AnnotationError(f"{annotator.name}: judged {len(verdicts)} of {len(tasks)} tasks")
            for task, verdict in zip(tasks, verdicts):
                if verdict is None:
                    self.skip(task.token, annotator.name, "declined by the simulated annotator")
                elif not self.submit(task.token, annotator.name, verdict).duplicate:
                    stored += 1
        return stored

    # -- progress ---------------------------------------------------------------------------------

    def missing_labels(self, round: int | None = None) -> int:
        """Labels the round (or every round) still needs from anyone."""
        with self._tx(write=False) as s:
            q = (select(func.coalesce(func.sum(Task.labels_needed - Task.labels_done), 0))
                 .where(Task.labels_done < Task.labels_needed))
            if round is not None:
                q = q.where(Task.round == round)
            return int(s.scalar(q) or 0)

    def progress(self, user: str, *, round: int | None = None, max_age: float = 0.0) -> Progress:
        """``user``'s counts, exact, and the round's (labels missing, open tasks), which may be up to
        ``max_age`` seconds old: a page refreshing them after every submit of 50 annotators need
        not scan the round each time."""
        now = self.clock()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        with self._tx(write=False) as s:
            u = self._user(s, user)
            mine = select(func.count(Label.id)).where(Label.user_id == u.id)
            mine_round = mine if round is None else mine.where(Label.round == round)
            today, in_round = (int(s.scalar(q) or 0) for q in (mine.where(Label.created_at >= midnight), mine_round))
            missing = self._round_missing(s, round, max_age)
            # tasks open to this user: what a lease would offer (not the ones others' leases fill) + the ones they hold
            mine_done = exists().where(Assignment.task_id == Task.id, Assignment.user_id == u.id,
                                       Assignment.status.in_(("submitted", "skipped")))
            others = self._live_leases(Task.id, now, except_user=u.id).scalar_subquery()
            open_q = select(func.count(Task.id)).where(Task.labels_done < Task.labels_needed, ~mine_done,
                                                        Task.labels_done + others < Task.labels_needed)
            if round is not None:
                open_q = open_q.where(Task.round == round)
            closed_rounds = self._closed(s)
            if closed_rounds:
                open_q = open_q.where(Task.round.not_in(closed_rounds))
            available = int(s.scalar(open_q) or 0)
            if not available and missing and max_age > 0:  # "nothing left to label" must not sit beside a stale count
                missing = self._round_missing(s, round, 0.0)
        return Progress(today, in_round, missing, available)

    def _round_missing(self, s: Session, round: int | None, max_age: float) -> int:
        """Labels a round (None: all) still needs, cached for ``max_age`` seconds."""
        at = time.monotonic()
        hit = self._counts_cache.get(round)
        if hit is not None and at - hit[0] <= max_age:
            return hit[1]
        q = select(func.coalesce(func.sum(Task.labels_needed - Task.labels_done), 0)).where(
            Task.labels_done < Task.labels_needed)
        if round is not None:
            q = q.where(Task.round == round)
        missing = int(s.scalar(q) or 0)
        self._counts_cache[round] = (at, missing)
        return missing


def overlap_labels_fn(specs: Sequence[TaskSpec], labels: int, overlap: float, overlap_n: int, seed: int) -> list[int]:
    """Labels needed per spec: the task's own ``labels`` if given, else the overlap policy."""
    try:
        policy = overlap_labels([t.uid for t in specs], labels=labels, overlap=overlap, overlap_labels=overlap_n, seed=seed)
    except ValueError as exc:
        raise AnnotationError(str(exc)) from None
    return [t.labels if t.labels is not None else policy[t.uid] for t in specs]
