"""The values the annotation store hands to callers: plain data with no session attached, and its constants."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from data.schemas import Message
from data.store.label import AnnotationError, Judgement

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
class TaskWait:
    """An unfinished task of a round, and who could still label it (:meth:`AnnotationStore.task_waits`)."""

    uid: str
    round: int
    missing: int  # labels it still needs
    labelled: tuple[str, ...]  # who labelled it
    skipped: tuple[str, ...]  # who skipped it
    held: tuple[tuple[str, dt.datetime, dt.datetime], ...]  # live leases: (user, since, until)
    eligible: tuple[str, ...]  # active annotators who have neither labelled nor skipped it

    @property
    def settled(self) -> bool:
        """Nobody is left who could label it, and someone labelled or skipped it: the round counts it as
        done with the labels it has (a round never waits for labels that no account can give)."""
        return not self.eligible and bool(self.labelled or self.skipped)

    def why(self) -> str:
        """Why the round waits for this task (or why it no longer does), in words."""
        if self.settled:
            return (f"settled with {len(self.labelled)} label(s), {self.missing} short: every active annotator has "
                    f"labelled or skipped it")
        if not self.eligible:
            return "no active annotator account can label it (align annotate add-user NAME --project ...)"
        text = f"needs {self.missing} more label(s), from: {', '.join(self.eligible)}"
        if self.held:
            text += "; held by " + ", ".join(f"{u} since {t:%H:%M} UTC (returns to the queue at {end:%H:%M} unless labelled "
                                             "or renewed by an open page)" for u, t, end in self.held)
        if len(self.eligible) < self.missing:
            text += (f" (only {len(self.eligible)} can still label it: it will be settled short once they have, "
                     "or lower its count: align annotate set-labels / drop-task)")
        return text


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
