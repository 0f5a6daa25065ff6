"""Failed-login throttling and login sessions for the annotation app (used by :mod:`ui.security`'s middleware).
Pure logic with an injectable clock, so the rules are tested without sleeping."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("align.annotate.security")


class LoginThrottle:
    """Failed logins, counted so that an attacker cannot cheaply lock out others (as django-axes and similar
    throttles do):

    - per user name **and** address: ``max_failures`` within ``window_seconds`` lock that pair (the usual
      password-guessing case; the same name from another address, e.g. the real annotator, still logs in);
    - per address: ``address_factor`` x ``max_failures`` failures (any names) lock the address, so annotators
      behind one proxy or NAT are not all refused because of a few typos;
    - per user name over all addresses: ``name_factor`` x ``max_failures`` failures lock the name, except from
      addresses that have logged in as that name before (a guessing botnet cannot lock out the account's owner);
    - ``align annotate unlock NAME`` (``unlocked_at``: the time of the latest unlock) clears a name's locks.
    """

    def __init__(self, max_failures: int, lockout_seconds: float, clock: Callable[[], float] = time.time, *,
                 address_factor: int = 10, name_factor: int = 4, window_seconds: float = 900.0,
                 unlocked_at: Callable[[str], float | None] | None = None, cache_seconds: float = 1.0) -> None:
        self.max_failures, self.lockout_seconds, self.clock = max_failures, lockout_seconds, clock
        self.window_seconds = max(window_seconds, lockout_seconds)  # failures counted this far back (the lock resets them)
        self.address_factor, self.name_factor = address_factor, name_factor
        self.unlocked_at, self.cache_seconds = unlocked_at, cache_seconds
        self._failures: dict[tuple, list[float]] = {}
        self._locked: dict[tuple, tuple[float, float]] = {}  # key -> (locked at, locked until)
        self._known: dict[str, set[str]] = {}  # name -> addresses it logged in from
        self._unlocks: dict[str, tuple[float, float | None]] = {}  # name -> (checked at, unlocked at)
        self._lock = threading.Lock()

    def _limits(self, user: str, address: str) -> list[tuple[tuple, int]]:
        user = user.strip()
        return [(("pair", user, address), self.max_failures), (("address", address), self.max_failures * self.address_factor),
                (("user", user), self.max_failures * self.name_factor)]

    def _unlocked(self, user: str, now: float) -> float | None:
        if self.unlocked_at is None:
            return None
        hit = self._unlocks.get(user)
        if hit is None or now - hit[0] >= self.cache_seconds:
            hit = (now, self.unlocked_at(user))
            self._unlocks[user] = hit
        return hit[1]

    def locked_for(self, user: str, address: str) -> float:
        """Seconds until a login for ``user`` from ``address`` is accepted again (0: now)."""
        now, user = self.clock(), user.strip()
        unlocked = self._unlocked(user, now)
        with self._lock:
            wait = 0.0
            for key, _ in self._limits(user, address):
                if key[0] == "user" and address in self._known.get(user, ()):
                    continue  # the owner's usual address is not locked out by guesses from elsewhere
                at, until = self._locked.get(key, (now, now))
                if unlocked is not None and key[0] != "address" and at <= unlocked:
                    self._locked.pop(key, None)  # an admin unlocked the name after this lock began
                    self._failures.pop(key, None)
                    continue
                wait = max(wait, until - now)
            return wait

    def failure(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key, limit in self._limits(user, address):
                recent = [t for t in self._failures.get(key, []) if now - t < self.window_seconds] + [now]
                if len(recent) >= limit:
                    self._locked[key] = (now, now + self.lockout_seconds)
                    recent = []
                self._failures[key] = recent

    def success(self, user: str, address: str) -> None:
        user = user.strip()
        with self._lock:
            self._failures.pop(("pair", user, address), None)
            self._known.setdefault(user, set()).add(address)


class Sessions:
    """Login tokens with the time they were issued and the credential they were issued for
    (:meth:`AnnotationStore.session_key`)."""

    def __init__(self, store: Any, hours: float, clock: Callable[[], float] = time.time, cache_seconds: float = 1.0) -> None:
        self.store, self.max_age, self.clock, self.cache_seconds = store, hours * 3600.0, clock, cache_seconds
        self._sessions: dict[str, tuple[str, str | None, float]] = {}
        self._keys: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def _key(self, user: str) -> str | None:
        now = self.clock()
        hit = self._keys.get(user)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        key = self.store.session_key(user)
        self._keys[user] = (now, key)
        return key

    def start(self, token: str, user: str) -> None:
        now = self.clock()
        key = self._key(user)
        with self._lock:
            self._sessions = {t: s for t, s in self._sessions.items() if now - s[2] < self.max_age}  # forget old ones
            self._sessions[token] = (user, key, now)

    def valid(self, token: str, user: str) -> bool:
        with self._lock:
            known = self._sessions.get(token)
        if known is None:  # a token this process did not see issued: start counting now
            self.start(token, user)
            known = self._sessions[token]
        name, key, issued = known
        ok = name == user and key is not None and self.clock() - issued < self.max_age and self._key(user) == key
        if not ok:
            with self._lock:
                self._sessions.pop(token, None)
            reason = "expired" if self.clock() - issued >= self.max_age else "password changed or account deactivated"
            log.info("session of %r ended: %s", user, reason)
        return ok
