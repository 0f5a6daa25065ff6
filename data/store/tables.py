"""The annotation database: tables, the schema-version table and migrations.

Tables (all timestamps UTC):

``schema_version``  one row per applied migration (``version``, ``applied_at``, ``note``)
``users``           annotators and admins: ``name``, ``role`` (annotator | admin), ``kind`` (human |
                    simulated), a salted scrypt ``password_hash`` (humans only), ``active``
``tasks``           one comparison task: ``round``, ``uid`` (unique per round), ``seq`` (queue order),
                    the prompt (JSON messages), the TRUE ``response_a`` / ``response_b`` and their
                    sources, ``category``, ``labels_needed`` and ``labels_done``
``assignments``     a task given to one annotator (at most one row per task and user): a random
                    ``token`` the page submits with, ``swapped`` (True when the left side shows the
                    true B), ``status`` (leased | submitted | skipped | released), the lease's
                    ``expires_at``, the skip reason
``labels``          one judgement, in TRUE identities: ``chosen`` (A | B), ``strength``, ``safe_a``,
                    ``safe_b``, ``both_bad``, ``comment``; unique per (task, user) and per assignment,
                    so a label can never be stored twice
``events``          append-only audit log (lease, submit, skip, undo, release, export, add-user)
``exports``         every export written: round, version (1, 2, ...), path, policy, count, sha256

Migrations: :data:`MIGRATIONS` maps a version to a function run inside one transaction; opening a
database applies the missing ones in order and records each in ``schema_version``. A database
written by a newer ``align`` (a version above :data:`SCHEMA_VERSION`) is refused, never altered.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime stored the same way in SQLite (naive text) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the annotation store; use UTC-aware datetimes")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class JSONText(TypeDecorator):
    """JSON kept as text (portable across SQLite and PostgreSQL, readable with any SQL client)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    note: Mapped[str] = mapped_column(String(200), default="")


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # annotator | admin
    kind: Mapped[str] = mapped_column(String(20))  # human | simulated
    password_hash: Mapped[str | None] = mapped_column(String(300), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("round", "uid", name="uq_tasks_round_uid"),
        Index("ix_tasks_round_seq", "round", "seq"),
        # covers the progress counts (labels still missing, open tasks) without reading the task texts
        Index("ix_tasks_round_counts", "round", "labels_done", "labels_needed"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    uid: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[list] = mapped_column(JSONText)  # [{role, content}, ...] ending with a user turn
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    source_a: Mapped[dict | None] = mapped_column(JSONText, nullable=True)
    source_b: Mapped[dict | None] = mapped_column(JSONText, nullable=True)
    category: Mapped[str | None] = mapped_column(String(20), nullable=True)
    labels_needed: Mapped[int] = mapped_column(Integer)
    labels_done: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict] = mapped_column(JSONText, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "user_id", name="uq_assignments_task_user"),
        Index("ix_assignments_task_status", "task_id", "status"),
        Index("ix_assignments_user_status", "user_id", "status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    swapped: Mapped[bool] = mapped_column(Boolean)  # True: the left side shows the true B
    status: Mapped[str] = mapped_column(String(20))  # leased | submitted | skipped | released
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Label(Base):
    __tablename__ = "labels"
    # sqlite_autoincrement: an undone label's id is never handed out again (SQLite reuses the highest
    # rowid otherwise), so every label id in the audit log names one judgement; PostgreSQL never reuses
    __table_args__ = (UniqueConstraint("task_id", "user_id", name="uq_labels_task_user"), Index("ix_labels_round", "round"),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    round: Mapped[int] = mapped_column(Integer)
    chosen: Mapped[str] = mapped_column(String(1))  # true identity: A | B
    strength: Mapped[str | None] = mapped_column(String(30), nullable=True)
    safe_a: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    safe_b: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    both_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    swapped: Mapped[bool] = mapped_column(Boolean)  # copied from the assignment: position-bias statistics
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # lease issued -> submitted
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    action: Mapped[str] = mapped_column(String(20))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), nullable=True)
    detail: Mapped[dict] = mapped_column(JSONText, default=dict)


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("round", "version", name="uq_exports_round_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    policy: Mapped[str] = mapped_column(String(20))
    n_records: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


# ---------------------------------------------------------------------------------------------
# migrations


def _v1_initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _v2_label_ids_never_reused(conn: Connection) -> None:
    """SQLite: rebuild ``labels`` with AUTOINCREMENT and start its sequence above every label id that the
    table or the audit log ever named (an id undone before this migration is not handed out again)."""
    if conn.dialect.name != "sqlite":
        return  # PostgreSQL's sequences never hand an id out twice
    sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'labels'")).scalar() or ""
    if "AUTOINCREMENT" not in sql.upper():
        cols = ", ".join(c.name for c in Label.__table__.columns)
        conn.execute(text("ALTER TABLE labels RENAME TO labels_v1"))
        conn.execute(text("DROP INDEX IF EXISTS ix_labels_round"))
        Label.__table__.create(conn)
        conn.execute(text(f"INSERT INTO labels ({cols}) SELECT {cols} FROM labels_v1"))
        conn.execute(text("DROP TABLE labels_v1"))
    highest = conn.execute(text("SELECT max(id) FROM labels")).scalar() or 0
    for detail in conn.execute(text("SELECT detail FROM events WHERE detail LIKE '%\"label\"%'")).scalars():
        named = json.loads(detail or "{}").get("label")
        if isinstance(named, int):
            highest = max(highest, named)
    conn.execute(text("DELETE FROM sqlite_sequence WHERE name = 'labels'"))
    conn.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES ('labels', :seq)"), {"seq": highest})


# version -> (note, function). Append new versions; never edit a released one.
MIGRATIONS: dict[int, tuple[str, Callable[[Connection], None]]] = {
    1: ("initial schema: users, tasks, assignments, labels, events, exports", _v1_initial),
    2: ("label ids are never reused (SQLite AUTOINCREMENT, sequence above every id the audit log named)",
        _v2_label_ids_never_reused),
}
assert max(MIGRATIONS) == SCHEMA_VERSION


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this version of align."""


def current_version(conn: Connection) -> int | None:
    """The highest applied schema version, 0 for an empty database, None for a foreign one."""
    names = set(inspect(conn).get_table_names())
    if "schema_version" not in names:
        return 0 if not names & set(Base.metadata.tables) else None
    return conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.version.desc()).limit(1)).scalar() or 0


def migrate(conn: Connection, now: dt.datetime, url: str) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION` (inside the caller's transaction). Concurrent
    openers wait for each other: SQLite's write lock (BEGIN IMMEDIATE), a PostgreSQL advisory lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7351862)"))  # any fixed number: "align schema"
    version = current_version(conn)
    if version is None:
        raise SchemaError(f"{url}: holds annotation tables but no schema_version table; not an align database "
                          "(or one from before versioning); refusing to touch it")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{url}: schema version {version} is newer than this align supports ({SCHEMA_VERSION}); "
                          "upgrade align instead of opening it with an older version")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        note, fn = MIGRATIONS[v]
        fn(conn)
        SchemaVersion.__table__.create(conn, checkfirst=True)
        conn.execute(SchemaVersion.__table__.insert().values(version=v, applied_at=now, note=note))
    return SCHEMA_VERSION
