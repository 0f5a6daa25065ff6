"""The annotation store's round management: what a round waits for (:class:`TaskWait`: who could still
label each unfinished task, who holds it), and an admin's fixes (release leases, change how many labels a
task needs, drop it). The third layer of :class:`data.store.AnnotationStore`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from data.store.label import AnnotationError
from data.store.queue import QueueStore
from data.store.tables import Assignment, Task, User
from data.store.values import TaskWait


class RoundStore(QueueStore):
    """What a round waits for, and an admin's fixes."""

    def active_annotators(self) -> list[str]:
        """Active human accounts with the annotator role (the people a round can wait for)."""
        with self._tx(write=False) as s:
            return list(s.scalars(select(User.name).where(User.active, User.kind == "human", User.role == "annotator")
                                  .order_by(User.name)))

    def team_warning(self, round: int) -> str | None:
        """A warning when some task of ``round`` needs more labels than there are active annotators."""
        waits = self.task_waits(round)
        team = self.active_annotators()
        most = max((w.missing for w in waits), default=0)
        if most <= len(team):
            return None
        short = sum(w.missing > len(team) for w in waits)
        return (f"{short} task(s) of round {round} need up to {most} labels but there are {len(team)} active annotators "
                f"({', '.join(team) or 'none'}); each will be settled with fewer labels once every annotator has labelled "
                "or skipped it. Add annotators (align annotate add-user) or queue fewer labels (--overlap-labels)")

    def task_waits(self, round: int) -> list[TaskWait]:
        """Every task of ``round`` that still needs labels, with who labelled, skipped or holds it and
        who could still label it: active human annotators, and active admins who took part in the round
        (admins label only when they choose to). Simulated annotators label when the round runs them."""
        now = self.clock()
        with self._tx(write=False) as s:
            tasks = s.execute(select(Task.id, Task.uid, Task.labels_needed - Task.labels_done)
                              .where(Task.round == round, Task.labels_done < Task.labels_needed)
                              .order_by(Task.seq)).all()
            if not tasks:
                return []
            users = {u.id: u for u in s.scalars(select(User))}
            rows = s.execute(select(Assignment.task_id, Assignment.user_id, Assignment.status, Assignment.expires_at,
                                    Assignment.issued_at).join(Task, Task.id == Assignment.task_id)
                             .where(Task.round == round)).all()
        took_part = {r.user_id for r in rows if r.status in ("submitted", "skipped", "leased")}
        pool = [u for u in users.values() if u.active and u.kind == "human"
                and (u.role == "annotator" or u.id in took_part)]
        by_task: dict[int, list[Any]] = {}
        for r in rows:
            by_task.setdefault(r.task_id, []).append(r)
        out = []
        for task_id, uid, missing in tasks:
            mine = by_task.get(task_id, [])
            done = {r.user_id for r in mine if r.status in ("submitted", "skipped")}
            out.append(TaskWait(
                uid=uid, round=round, missing=int(missing),
                labelled=tuple(sorted(users[r.user_id].name for r in mine if r.status == "submitted")),
                skipped=tuple(sorted(users[r.user_id].name for r in mine if r.status == "skipped")),
                held=tuple(sorted((users[r.user_id].name, r.issued_at, r.expires_at) for r in mine
                                  if r.status == "leased" and r.expires_at > now)),
                eligible=tuple(sorted(u.name for u in pool if u.id not in done))))
        return out

    def leases(self, round: int | None = None) -> list[dict]:
        """Live leases: who holds which task since when (JSON-ready)."""
        now = self.clock()
        with self._tx(write=False) as s:
            q = (select(User.name, Task.uid, Task.round, Assignment.issued_at, Assignment.expires_at)
                 .join(User, User.id == Assignment.user_id).join(Task, Task.id == Assignment.task_id)
                 .where(Assignment.status == "leased", Assignment.expires_at > now))
            if round is not None:
                q = q.where(Task.round == round)
            return [{"user": n, "task": uid, "round": r, "since": since.isoformat(), "expires": exp.isoformat()}
                    for n, uid, r, since, exp in s.execute(q.order_by(Assignment.issued_at))]

    def release_leases(self, *, user: str | None = None, round: int | None = None, task: str | None = None,
                       by: str | None = None) -> int:
        """An admin's release: the live leases of ``user`` and/or of one ``task`` (its uid in ``round``)
        go back to the queue. Returns how many."""
        if user is None and task is None:
            raise AnnotationError("release what? name a user, a task (with its round), or both")
        if task is not None and round is None:
            raise AnnotationError("a task is named by its round and its id: give the round too")
        now = self.clock()
        with self._tx() as s:
            q = select(Assignment).where(Assignment.status == "leased", Assignment.expires_at > now)
            if user is not None:
                q = q.where(Assignment.user_id == self._user(s, user).id)
            if task is not None:
                q = q.where(Assignment.task_id == self._task(s, round, task).id)  # type: ignore[arg-type]
            held = list(s.scalars(q))
            for a in held:
                a.status, a.finished_at = "released", now
                self._event(s, "release", None, a.task_id, by=by, admin=True)
            return len(held)

    def set_labels_needed(self, round: int, task: str, labels: int | None, *, by: str | None = None) -> int:
        """Lower (or raise) how many labels one task needs; never below the labels it has. ``labels`` None
        (or equal to its labels so far) drops it from what the round waits for (``align annotate drop-task``).
        Live leases beyond the new count return to the queue. Returns the task's labels so far."""
        if labels is not None and (not isinstance(labels, int) or isinstance(labels, bool) or labels < 0):
            raise AnnotationError(f"labels must be an integer >= 0, got {labels!r}")
        with self._tx() as s:
            self._check_open(s, round)
            t = self._task(s, round, task, lock=True)
            labels = t.labels_done if labels is None else labels
            if labels < t.labels_done:
                raise AnnotationError(f"task {task!r} of round {round} already has {t.labels_done} labels; it cannot need "
                                      f"fewer (undoing labels is the annotators' call)")
            old, t.labels_needed = t.labels_needed, labels
            if t.labels_done >= labels:
                for a in s.scalars(select(Assignment).where(Assignment.task_id == t.id, Assignment.status == "leased")):
                    a.status = "released"
            self._event(s, "set-labels", None, t.id, round=round, old=old, new=labels, by=by)
            return t.labels_done

    @staticmethod
    def _task(s: Session, round: int | None, uid: str, *, lock: bool = False) -> Task:
        q = select(Task).where(Task.round == round, Task.uid == uid)
        t = s.scalars(q.with_for_update() if lock else q).first()
        if t is None:
            raise AnnotationError(f"round {round} has no task {uid!r}")
        return t
