"""The annotation store's base: the database connection, transactions, the audit log and users.

:class:`data.store.store.AnnotationStore` is this plus the task queue (:mod:`data.store.queue`) plus export
and statistics; the transaction rules of every method are in :mod:`data.store.store`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from data.store.label import AnnotationError
from data.store.passwords import dummy_hash, hash_password, verify_password
from data.store.tables import Assignment, Event, SchemaError, User, migrate
from data.store.values import (
    DEFAULT_DB,
    KINDS,
    NAME_RE,
    ROLES,
    UserInfo,
    normalize_url,
    utcnow,
)

log = logging.getLogger(__name__)


def _wal(cur: Any, timeout: float = 60.0) -> None:
    """Put the database in WAL mode (it stays so in the file). Switching needs the database to itself, and
    SQLite answers "database is locked" at once, without waiting for its busy timeout, when another connection
    opens the new file at the same moment (several processes or threads opening a new project's store), so
    the switch is retried for up to ``timeout`` seconds; a database already in WAL is left as it is."""
    import sqlite3

    deadline, delay = time.monotonic() + timeout, 0.01
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            mode = str(cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if mode == "wal":
                return
            problem = f"it stayed in {mode} mode"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            problem = str(exc)
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"could not switch the annotation database to WAL mode in {timeout:.0f} s: "
                                           f"{problem}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


class StoreBase:
    """Connection, transactions, the audit log and users (the first layer of :class:`AnnotationStore`)."""
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
        self._counts_cache: dict[int | None, tuple[float, int]] = {}  # see progress(max_age=)
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
            _wal(cur)
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
            # the account's session epoch: every (de)activation starts a new one, so `activate` revives no session
            epoch = None if user is None else s.scalar(select(func.max(Event.id)).where(
                Event.user_id == user.id, Event.action == "set-active"))
        if user is None or not user.active or user.kind != "human" or not user.password_hash:
            return None
        return hashlib.sha256(f"{user.password_hash}|{epoch or 0}".encode()).hexdigest()[:32]

    def unlock(self, name: str, *, by: str | None = None) -> None:
        """Clear the login locks of ``name`` (a running server sees it within a second)."""
        with self._tx() as s:
            self._event(s, "unlock", self._user(s, name), by=by)

    def unlocked_at(self, name: str) -> dt.datetime | None:
        """When an admin last cleared ``name``'s login locks (None: never)."""
        with self._tx(write=False) as s:
            return s.scalar(select(func.max(Event.at)).join(User, User.id == Event.user_id)
                            .where(User.name == name, Event.action == "unlock"))

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
