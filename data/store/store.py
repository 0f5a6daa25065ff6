"""The annotation store: users, the task queue with leases, labels, export and statistics.

Length (~840 lines): one class, AnnotationStore, each public method one documented transaction; they are read
together because their isolation depends on each other (leases, submit, undo, change, export). Tables, export plans,
pair files, statistics and the label's fields (label.py) already live beside it.

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

import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from sqlalchemy import create_engine, delete, event, exists, func, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from data.errors import DataError
from data.schemas import Message
from data.store.export import POLICIES, ExportPlan, LabelRecord, Policy, plan_export
from data.store.label import AnnotationError, Judgement
from data.store.pairs import MAX_RESPONSE_BYTES, TaskSpec, overlap_labels, parse_task, read_tasks
from data.store.passwords import dummy_hash, hash_password, verify_password
from data.store.stats import summarize
from data.store.tables import Assignment, Event, Export, Label, SchemaError, Task, User, migrate

log = logging.getLogger(__name__)

ROLES = ("annotator", "admin")
KINDS = ("human", "simulated")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,99}$")
DEFAULT_DB = "sqlite:///runs/annotations.db"
DEFAULT_EXPORT_DIR = "runs/annotations/exports"


class LeaseLost(AnnotationError):
    """The lease expired or was released and the task's remaining slots went to other annotators."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def normalize_url(url: str) -> str:
    """``runs/a.db`` -> ``sqlite:///runs/a.db``; ``postgresql://`` -> the installed psycopg (3) driver."""
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# ---------------------------------------------------------------------------------------------
# values handed to callers (plain data: no session attached)


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: str
    kind: str
    active: bool
    has_password: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class LeasedTask:
    """A task leased to one annotator. ``response_a``/``response_b`` are the TRUE responses; a page
    shows ``left``/``right`` (randomised per assignment) and maps the click back with :meth:`true_choice`."""

    token: str  # submit/skip with this
    task_id: int
    uid: str
    round: int
    prompt: list[Message]
    response_a: str
    response_b: str
    source_a: dict | None
    source_b: dict | None
    category: str | None
    labels_needed: int
    swapped: bool  # True: the left side shows the true B
    expires_at: dt.datetime
    meta: dict = field(default_factory=dict)

    @property
    def left(self) -> str:
        return self.response_b if self.swapped else self.response_a

    @property
    def right(self) -> str:
        return self.response_a if self.swapped else self.response_b

    def true_choice(self, side: str) -> str:
        """``"left"``/``"right"`` (what the annotator clicked) -> the true ``"A"``/``"B"``."""
        if side not in ("left", "right"):
            raise AnnotationError(f"expected 'left' or 'right', got {side!r}")
        return ("B" if self.swapped else "A") if side == "left" else ("A" if self.swapped else "B")

    def true_safety(self, left_safe: bool | None, right_safe: bool | None) -> tuple[bool | None, bool | None]:
        """Safety labels given for the shown sides -> (safe_a, safe_b)."""
        return (right_safe, left_safe) if self.swapped else (left_safe, right_safe)


@dataclass(frozen=True)
class RecentLabel:
    """One of an annotator's own labels, as the page lists them (TRUE identities)."""

    label_id: int
    task_uid: str
    round: int
    prompt: str  # the last user turn
    chosen: str
    strength: str | None
    created_at: dt.datetime
    changeable: bool  # its round is still open


@dataclass(frozen=True)
class SubmitResult:
    label_id: int
    task_uid: str
    round: int
    chosen: str
    duplicate: bool  # the lease had already been submitted: nothing new was stored


@dataclass(frozen=True)
class Progress:
    done_today: int  # this user's labels since 00:00 UTC
    done_round: int  # this user's labels in the round(s)
    missing: int  # labels the round(s) still need from anyone
    available: int  # tasks this user may still take


@dataclass(frozen=True)
class ExportResult:
    path: Path
    round: int
    version: int
    policy: str
    records: int
    tasks: int
    ties_dropped: int
    incomplete_skipped: int
    sha256: str


class SimulatedAnnotator(Protocol):
    """Anything that labels tasks: a reward model, an LLM judge, a rule set.

    ``name`` is its user name in the store (by convention ``sim:<what>``, e.g. ``sim:rm-helpful``);
    ``judge`` returns one :class:`Judgement` per task, or None to skip it.
    """

    name: str

    def judge(self, tasks: Sequence[LeasedTask]) -> Sequence[Judgement | None]: ...


# ---------------------------------------------------------------------------------------------


class AnnotationStore:
    """The annotation database. Thread-safe: every method opens its own short transaction."""

    def __init__(self, url: str = DEFAULT_DB, *, lease_seconds: float = 1800.0, sqlite_synchronous: str = "FULL",
                 clock: Callable[[], dt.datetime] = utcnow, echo: bool = False) -> None:
        self.url = normalize_url(url)
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.clock = clock
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
                raise ValueError(f"sqlite_synchronous must be FULL, NORMAL or EXTRA, got {sqlite_synchronous!r}")
            db = parsed.database
            if not db or db == ":memory:":
                raise ValueError("the annotation store needs a file (sqlite:///path.db); an in-memory database is not "
                                 "shared between threads")
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, echo=echo, pool_size=10, max_overflow=40,
                                        connect_args={"check_same_thread": False, "timeout": 60})
            self._sqlite_setup(self.engine, sqlite_synchronous.upper())
        else:
            self.engine = create_engine(self.url, echo=echo, pool_size=10, max_overflow=40, pool_pre_ping=True)
        self._write_engine = self.engine.execution_options(immediate=True)
        self._counts_cache: dict[int | None, tuple[float, tuple[int, int]]] = {}  # see progress(max_age=)
        try:
            with self._tx() as s:
                self.schema_version = migrate(s.connection(), self.clock(), self._safe_url())
        except SchemaError:
            self.engine.dispose()
            raise

    @staticmethod
    def _sqlite_setup(engine: Engine, synchronous: str) -> None:
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # pysqlite must not BEGIN on its own; we do it below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AnnotationStore({self._safe_url()!r})"

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction; committed (and, on SQLite FULL, fsynced) when the block ends."""
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def _retrying(self, fn: Callable[[], Any], attempts: int = 5) -> Any:
        """Run a write transaction again after a lost race (unique key, deadlock, busy database)."""
        for i in range(attempts):
            try:
                return fn()
            except (IntegrityError, OperationalError) as exc:
                if i == attempts - 1:
                    raise
                log.debug("retrying after %s", type(exc).__name__)

    def _event(self, s: Session, action: str, user: User | None = None, task_id: int | None = None, **detail: Any) -> None:
        s.add(Event(at=self.clock(), user_id=user.id if user else None, action=action, task_id=task_id, detail=detail))

    # -- users -------------------------------------------------------------------------------------

    def add_user(self, name: str, *, role: str = "annotator", kind: str = "human", password: str | None = None) -> UserInfo:
        """Create a user. Humans need a password (only its salted scrypt hash is stored); simulated
        annotators have none and cannot log in to the web app."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # fullmatch: "ann1\n" is not "ann1"
            raise AnnotationError(f"invalid user name {name!r}: use 1-100 letters, digits and _ . : @ + - (starting "
                                  "with a letter or digit)")
        if role not in ROLES:
            raise AnnotationError(f"unknown role {role!r}; expected one of: {', '.join(ROLES)}")
        if kind not in KINDS:
            raise AnnotationError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")
        if kind == "human" and not password:
            raise AnnotationError(f"user {name!r}: a human annotator needs a password")
        if kind == "simulated" and password:
            raise AnnotationError(f"user {name!r}: a simulated annotator cannot have a password (it never logs in)")
        pw = hash_password(password) if password else None
        try:
            with self._tx() as s:
                if s.scalar(select(User.id).where(User.name == name)) is not None:
                    raise AnnotationError(f"user {name!r} exists already")
                user = User(name=name, role=role, kind=kind, password_hash=pw, active=True, created_at=self.clock())
                s.add(user)
                s.flush()
                self._event(s, "add-user", user, role=role, kind=kind)
        except IntegrityError:
            raise AnnotationError(f"user {name!r} exists already") from None
        return UserInfo(name, role, kind, True, pw is not None)

    def set_password(self, name: str, password: str) -> None:
        with self._tx() as s:
            user = self._user(s, name)
            if user.kind != "human":
                raise AnnotationError(f"user {name!r} is a simulated annotator; it has no password")
            user.password_hash = hash_password(password)
            self._event(s, "set-password", user)

    def set_active(self, name: str, active: bool) -> None:
        """Deactivate (or reactivate) a user: an inactive user cannot log in or take tasks; their labels stay."""
        with self._tx() as s:
            user = self._user(s, name)
            user.active = active
            if not active:
                s.execute(update(Assignment).where(Assignment.user_id == user.id, Assignment.status == "leased")
                          .values(status="released"))
            self._event(s, "set-active", user, active=active)

    def session_key(self, name: str) -> str | None:
        """What a login session is bound to: a digest of the user's password hash, or None when the user
        cannot log in (unknown, inactive, simulated). A session whose key changed (the password was changed,
        the account deactivated) is over."""
        with self._tx(write=False) as s:
            user = s.scalars(select(User).where(User.name == name)).first()
        if user is None or not user.active or user.kind != "human" or not user.password_hash:
            return None
        return hashlib.sha256(user.password_hash.encode()).hexdigest()[:32]

    def authenticate(self, name: str, password: str) -> bool:
        """True for an active human user with this password. Takes the same time for unknown users."""
        with self._tx(write=False) as s:
            user = s.scalars(select(User).where(User.name == name)).first()
        ok = verify_password(password or "", user.password_hash if user and user.password_hash else dummy_hash())
        return bool(ok and user and user.active and user.kind == "human" and user.password_hash)

    def user(self, name: str) -> UserInfo | None:
        with self._tx(write=False) as s:
            u = s.scalars(select(User).where(User.name == name)).first()
            return None if u is None else UserInfo(u.name, u.role, u.kind, u.active, u.password_hash is not None)

    def users(self) -> list[UserInfo]:
        with self._tx(write=False) as s:
            return [UserInfo(u.name, u.role, u.kind, u.active, u.password_hash is not None)
                    for u in s.scalars(select(User).order_by(User.name))]

    @staticmethod
    def _user(s: Session, name: str, *, active: bool = False) -> User:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise AnnotationError(f"unknown user {name!r} (add it with `align annotate add-user`)")
        if active and not user.active:
            raise AnnotationError(f"user {name!r} is deactivated")
        return user

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

    def lease_tasks(self, user: str, n: int = 1, *, round: int | None = None) -> list[LeasedTask]:
        """Up to ``n`` tasks for ``user``: the live leases they hold first, then new ones in queue order.

        A task is offered only if it still needs labels once every live lease counts as one, and the
        user has neither labelled nor skipped it. A lease lasts ``lease_seconds``; an expired one
        frees its slot for others.
        """
        if n < 1:
            raise AnnotationError(f"n must be >= 1, got {n}")
        return self._retrying(lambda: self._lease(user, n, round))

    def next_task(self, user: str, *, round: int | None = None) -> LeasedTask | None:
        """The task ``user`` should label now (the one they already hold, or a new lease); None when done."""
        got = self.lease_tasks(user, 1, round=round)
        return got[0] if got else None

    def _lease(self, name: str, n: int, round: int | None) -> list[LeasedTask]:
        now = self.clock()
        out: list[LeasedTask] = []
        with self._tx() as s:
            u = self._user(s, name, active=True)
            held = select(Assignment, Task).join(Task, Task.id == Assignment.task_id).where(
                Assignment.user_id == u.id, Assignment.status == "leased", Assignment.expires_at > now)
            if round is not None:
                held = held.where(Task.round == round)
            for a, t in s.execute(held.order_by(Assignment.issued_at, Assignment.id).limit(n)):
                out.append(self._view(a, t))
            mine_done = exists().where(Assignment.task_id == Task.id, Assignment.user_id == u.id,
                                       Assignment.status.in_(("submitted", "skipped")))
            others = self._live_leases(Task.id, now, except_user=u.id).scalar_subquery()
            base = select(Task).where(Task.labels_done < Task.labels_needed, ~mine_done,
                                      Task.labels_done + others < Task.labels_needed)
            if round is not None:
                base = base.where(Task.round == round)
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
                a.status, a.issued_at, a.expires_at, a.finished_at = "leased", now, now + self.lease, None
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
            # open tasks this user has labelled or skipped: one index range over their own assignments
            closed_q = select(func.count(Assignment.id)).join(Task, Task.id == Assignment.task_id).where(
                Assignment.user_id == u.id, Assignment.status.in_(("submitted", "skipped")),
                Task.labels_done < Task.labels_needed)
            if round is not None:
                closed_q = closed_q.where(Task.round == round)
            today, in_round, closed = (int(s.scalar(q) or 0)
                                       for q in (mine.where(Label.created_at >= midnight), mine_round, closed_q))
            missing, open_tasks = self._round_counts(s, round, max_age)
        return Progress(today, in_round, missing, max(0, open_tasks - closed))

    def _round_counts(self, s: Session, round: int | None, max_age: float) -> tuple[int, int]:
        """(labels missing, open tasks) of a round (None: all), cached for ``max_age`` seconds."""
        at = time.monotonic()
        hit = self._counts_cache.get(round)
        if hit is not None and at - hit[0] <= max_age:
            return hit[1]
        q = select(func.coalesce(func.sum(Task.labels_needed - Task.labels_done), 0), func.count()).where(
            Task.labels_done < Task.labels_needed)
        if round is not None:
            q = q.where(Task.round == round)
        missing, open_tasks = s.execute(q).one()
        self._counts_cache[round] = (at, (int(missing), int(open_tasks)))
        return int(missing), int(open_tasks)

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
        return summarize(records, round=round, now=now, tasks=n_tasks, labels_needed=int(needed), labels_done=int(done),
                         missing=self.missing_labels(round), complete_tasks=complete, overlap_tasks=overlap_tasks, skips=skips)


def overlap_labels_fn(specs: Sequence[TaskSpec], labels: int, overlap: float, overlap_n: int, seed: int) -> list[int]:
    """Labels needed per spec: the task's own ``labels`` if given, else the overlap policy."""
    try:
        policy = overlap_labels([t.uid for t in specs], labels=labels, overlap=overlap, overlap_labels=overlap_n, seed=seed)
    except ValueError as exc:
        raise AnnotationError(str(exc)) from None
    return [t.labels if t.labels is not None else policy[t.uid] for t in specs]
