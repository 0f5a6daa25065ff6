"""Session and account security for the annotation app (what Argilla and Label Studio users expect).

Gradio's login keeps one token per login in memory for as long as the server runs, checks no
origin when the server listens on a non-loopback address, and sets its cookie ``SameSite=None``.
:class:`SecurityMiddleware` wraps the app (handed to ``Blocks.launch`` through ``app_kwargs``) so that:

- **sessions end** after ``session_hours`` (default 12), when the user's password changes
  (``align annotate passwd``) or the account is deactivated (``align annotate deactivate``): the
  next request finds its token gone and the page asks for a login again;
- **logins are throttled** (:class:`LoginThrottle`): ``max_failures`` failed logins for one user name
  from one address within ``window_seconds`` (15 minutes, or ``lockout_seconds`` if longer) refuse that name
  from that address (HTTP 429) for ``lockout_seconds``, before the password is checked; an address and a name
  have far higher ceilings, and a name's owner logging in from an address they used before is not locked out by
  guesses from elsewhere; ``align annotate unlock NAME`` clears a name's locks; every failed or
  refused login is logged with the name and the address. Gradio's login page shows a message only
  for HTTP 400 (wrong credentials), so the middleware adds :data:`LOGIN_PAGE_JS` to the app's HTML:
  a refused login shows "Too many failed logins; try again in N s." above the Login button;
- **cookies** are ``SameSite=Lax``, and ``Secure`` when the page is served over https (``X-Forwarded-Proto: https``
  from a trusted proxy); a logout that another site's link or redirect navigates to
  (``Sec-Fetch-Site: cross-site`` or ``same-site``, e.g. a page on another local port) is refused;
- **forwarded headers** (``X-Forwarded-For``) are believed only from the proxies named by
  ``align annotate serve --forwarded-allow-ips`` (none by default), so throttling and the log see the real peer;
- **cross-origin requests** that change state (every method but GET/HEAD/OPTIONS, and websockets)
  are refused (403) when their ``Origin`` is not the app's own and not in ``allowed_origins``
  (``--allowed-origin``, e.g. a reverse proxy's public URL). Clients that send no ``Origin``
  (``gradio_client``, scripts) are not browsers acting for another site and pass;
- **host names** are checked (DNS rebinding): a ``Host`` that is a name, not an IP address or ``localhost``, must
  be the --host served on or an --allowed-origin's host, else 400;
- **request bodies** over ``max_request_bytes`` (``--max-request-kb``, default 1 MiB; uploads too) get 413 before
  the app reads them; comments and skip reasons have their own limits, checked by the app (ui/app.py).

The throttle and the sessions live in the server process (a restart logs everyone out and
forgets failures), like Gradio's own tokens.
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ui.throttle import LoginThrottle, Sessions

log = logging.getLogger("align.annotate.security")

CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("align_client_address", default="?")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class SecurityPolicy:
    """``align annotate serve`` options: --session-hours, --max-login-failures, --login-lockout-seconds, --allowed-origin,
    --max-request-kb, --max-comment-chars, --max-skip-reason-chars (``server_host``: the --host it serves on)."""

    session_hours: float = 12.0
    max_failures: int = 5
    lockout_seconds: float = 300.0
    allowed_origins: list[str] = field(default_factory=list)
    max_request_bytes: int = 1024 * 1024
    max_comment_chars: int = 5000
    max_reason_chars: int = 500
    server_host: str = ""

    def __post_init__(self) -> None:
        if not self.session_hours > 0:
            raise ValueError(f"session_hours must be > 0, got {self.session_hours}")
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {self.max_failures}")
        if self.lockout_seconds < 0:
            raise ValueError(f"lockout_seconds must be >= 0, got {self.lockout_seconds}")
        for what in ("max_request_bytes", "max_comment_chars", "max_reason_chars"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1, got {getattr(self, what)}")
        for o in self.allowed_origins:
            u = urlsplit(o)
            if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
                raise ValueError(f"allowed origin {o!r}: expected scheme://host[:port], e.g. https://annotate.example.org")
        self.allowed_origins = [o.rstrip("/").lower() for o in self.allowed_origins]

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` names this server. An IP address or ``localhost`` always does; a host
        NAME only when it is the --host served on or the host of an --allowed-origin: a page on another site
        whose name was re-pointed at this machine (DNS rebinding) would otherwise pass the origin check, which
        compares the ``Origin`` with the ``Host`` the browser sent (Django's ALLOWED_HOSTS does the same)."""
        if not host_header:
            return True  # HTTP/1.0 clients; browsers always send Host
        name = urlsplit(f"//{host_header}").hostname or ""
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        named = {urlsplit(o).hostname for o in self.allowed_origins} | {self.server_host.lower()}
        return name in {"localhost", *named} or name.endswith(".localhost")


def guarded_auth(store: Any, throttle: LoginThrottle) -> Callable[[str, str], Any]:
    """Gradio's ``auth`` callable: the store's password check, with failures counted and logged."""
    import anyio

    async def auth(username: str, password: str) -> bool:
        address = CLIENT.get()
        if throttle.locked_for(username, address) > 0:  # also checked by the middleware before the form reaches here
            return False
        ok = await anyio.to_thread.run_sync(store.authenticate, username, password)  # scrypt: ~50 ms, off the event loop
        if ok:
            throttle.success(username, address)
        else:
            throttle.failure(username, address)
            log.warning("failed login: user=%r address=%s", username, address)
        return bool(ok)

    return auth


def _replay(body: bytes) -> Callable:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _refuse(scope: dict, send: Callable, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


LOGIN_PAGE_JS = rb"""<script id="align-login-refusals">
(() => {
  const fetch0 = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const r = await fetch0(input, init);
    const url = String(typeof input === 'string' ? input : (input && input.url) || '').split('?')[0];
    if (!/\/login\/?$/.test(url)) { return r; }
    let el = document.getElementById('login-refused');
    if (r.status === 429) {
      let text = 'Too many failed logins; try again later.';
      try { text = (await r.clone().json()).detail || text; } catch (e) {}
      if (!el) {
        el = document.createElement('p');
        el.id = 'login-refused';
        el.setAttribute('role', 'alert');
        el.style.cssText = 'color:#b91c1c;font-weight:600;margin:8px 0;text-align:center';
        const login = [...document.querySelectorAll('button')].find((b) => b.textContent.trim() === 'Login');
        if (login && login.parentElement) { login.parentElement.insertBefore(el, login); } else { document.body.prepend(el); }
      }
      el.textContent = text;
    } else if (el) {
      el.remove();
    }
    return r;
  };
})();
</script>"""


def _with_login_js(html: bytes) -> bytes:
    """The app's HTML page with :data:`LOGIN_PAGE_JS` before ``</head>`` (unchanged without one, or when present)."""
    if b"align-login-refusals" in html or b"</head>" not in html:
        return html
    return html.replace(b"</head>", LOGIN_PAGE_JS + b"</head>", 1)


def _login_name(content_type: str, body: bytes) -> str:
    """The user name a login form posts: URL-encoded (scripts) or multipart (the browser's login page)."""
    if content_type.lower().startswith("multipart/form-data"):
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
        for part in msg.iter_parts() if msg.is_multipart() else ():
            if part.get_param("name", header="content-disposition") == "username":
                return str(part.get_content()).strip()
        return ""
    return parse_qs(body.decode("utf-8", "replace")).get("username", [""])[0].strip()


def _cookies(scope: dict) -> dict[str, str]:
    """The request's cookies exactly as Starlette reads them for Gradio: every ``Cookie`` header, its lenient
    parser, the last value of a name winning."""
    from starlette.requests import cookie_parser

    cookies: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        if k.lower() == b"cookie":
            cookies.update(cookie_parser(v.decode("latin-1")))
    return cookies


def _without_endpoints(body: bytes, names: tuple[str, ...]) -> bytes:
    """Gradio's API description (``/info``) without the named endpoints."""
    import json

    try:
        info = json.loads(body)
    except ValueError:
        return body
    if isinstance(info, dict):
        for section in ("named_endpoints", "unnamed_endpoints"):
            if isinstance(info.get(section), dict):
                info[section] = {k: v for k, v in info[section].items() if k not in names}
    return json.dumps(info).encode()


def _lax(cookie: bytes, *, secure: bool = False) -> bytes:
    """A session cookie with ``SameSite=Lax`` (and ``Secure`` when the page was served over https)."""
    parts = [p.strip() for p in cookie.decode("latin-1").split(";")
             if p.strip().lower() not in ("samesite=none", "samesite=lax", "samesite=strict")]
    if secure and not any(p.lower() == "secure" for p in parts):
        parts.append("Secure")
    return ("; ".join(parts) + "; SameSite=Lax").encode("latin-1")


class TooLarge(Exception):
    pass


async def _read_body_capped(receive: Callable, limit: int) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            raise TooLarge
        more = message.get("more_body", False)
    return body


class SecurityMiddleware:
    """A pure ASGI middleware around the Gradio app (see the module docstring)."""

    def __init__(self, app: Any, *, policy: SecurityPolicy, sessions: Sessions, throttle: LoginThrottle, store: Any = None,
                 admin_endpoints: tuple[str, ...] = ()) -> None:
        self.app, self.policy, self.sessions, self.throttle = app, policy, sessions, throttle
        self.store, self.admin_endpoints = store, admin_endpoints

    def _origin_ok(self, scope: dict, headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        own = f"{scheme}://{headers.get('host', '')}".lower()
        return origin == own or origin in self.policy.allowed_origins

    def _is_admin(self, gr_app: Any, scope: dict) -> bool:
        """Whether the request's session (as the app reads it) belongs to an active admin."""
        tokens = getattr(gr_app, "tokens", None)
        if self.store is None or not isinstance(tokens, dict):
            return False
        cookies = _cookies(scope)
        cookie_id = getattr(gr_app, "cookie_id", "")
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            user = tokens.get(cookies.get(name, ""))
            if user is not None:
                info = self.store.user(user)
                return bool(info and info.is_admin and info.active)
        return False

    def _check_session(self, gr_app: Any, scope: dict) -> None:
        """End the session behind every access token this request carries, if it is over. The cookies are
        read exactly as Starlette reads them for Gradio (every ``Cookie`` header, its lenient parser, the
        last value of a name winning), so a token the app would accept is a token checked here."""
        tokens = getattr(gr_app, "tokens", None)
        if not isinstance(tokens, dict):
            return
        cookies = _cookies(scope)
        cookie_id = getattr(gr_app, "cookie_id", "")
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token is None:
                continue
            user = tokens.get(token)
            if user is not None and not self.sessions.valid(token, user):
                tokens.pop(token, None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?",))[0]
        ctx = CLIENT.set(address)
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            method = scope.get("method", "GET")
            if not self.policy.host_allowed(headers.get("host")):
                log.warning("refused a %s %s for host %r (address %s)", method, scope.get("path"), headers.get("host"), address)
                await _refuse(scope, send, 400, "unknown host: name it with align annotate serve --allowed-origin "
                                                "(an IP address or localhost always works)")
                return
            if (scope["type"] == "websocket" or method not in SAFE_METHODS) and not self._origin_ok(scope, headers):
                log.warning("refused a %s %s from origin %s (address %s)", method, scope.get("path"),
                            headers.get("origin"), address)
                await _refuse(scope, send, 403, "cross-origin request refused (align annotate serve --allowed-origin)")
                return
            if (scope["type"] == "http" and scope.get("path", "").rstrip("/").endswith("/logout")
                    and headers.get("sec-fetch-site") in ("cross-site", "same-site")):
                # a link or a redirect from another page (SameSite=Lax lets top-level GETs carry the cookie):
                # only the app's own pages, a typed URL or a non-browser client may end the session
                log.warning("refused a logout navigated to from another site (address %s)", address)
                await _refuse(scope, send, 403, "logout from another site refused; use the app's own Logout")
                return
            gr_app = scope.get("app")
            self._check_session(gr_app, scope)
            login = method == "POST" and scope.get("path", "").rstrip("/").endswith("/login")
            body: bytes | None = None
            if scope["type"] == "http" and method not in SAFE_METHODS:
                limit = self.policy.max_request_bytes
                length = headers.get("content-length", "")
                try:
                    if (length.isdigit() and int(length) > limit) or (not length.isdigit() and length):
                        raise TooLarge
                    if login or not length:  # the login's name is read here; a body of unknown length is counted
                        body = await _read_body_capped(receive, limit)
                except TooLarge:
                    log.warning("refused a %s %s over %d bytes (address %s)", method, scope.get("path"), limit, address)
                    await _refuse(scope, send, 413, f"request too large: over {limit // 1024} KiB "
                                                    "(align annotate serve --max-request-kb)")
                    return
                if body is not None:
                    receive = _replay(body)
            if login:
                assert body is not None
                user = _login_name(headers.get("content-type", ""), body)
                wait = self.throttle.locked_for(user, address)
                if wait > 0:
                    log.warning("login refused, too many failures: user=%r address=%s (%.0f s left)", user, address, wait)
                    await _refuse(scope, send, 429, f"Too many failed logins; try again in {math.ceil(wait)} s.")
                    return

            page: dict[str, Any] = {}  # a response held back until its body is complete, then rewritten
            api_info = (method == "GET" and scope["type"] == "http" and self.admin_endpoints
                        and scope.get("path", "").rstrip("/").endswith("/info") and not self._is_admin(gr_app, scope))

            async def send_secure(message: dict) -> None:
                if message["type"] == "http.response.start":
                    new_headers = []
                    for k, v in message.get("headers", []):
                        if k.lower() == b"set-cookie" and v.startswith(b"access-token"):
                            v = _lax(v, secure=scope.get("scheme") in ("https", "wss"))
                            if login and message.get("status") == 200 and gr_app is not None:
                                token = v.split(b";", 1)[0].split(b"=", 1)[1].decode("latin-1")
                                user = getattr(gr_app, "tokens", {}).get(token)
                                if user is not None:
                                    self.sessions.start(token, user)
                        new_headers.append((k, v))
                    message = {**message, "headers": new_headers}
                    names = {k.lower(): v for k, v in new_headers}
                    kind = names.get(b"content-type", b"")
                    if method == "GET" and scope["type"] == "http" and b"content-encoding" not in names:
                        if kind.startswith(b"text/html"):  # the login page gets LOGIN_PAGE_JS
                            page["start"], page["body"], page["rewrite"] = message, b"", _with_login_js
                            return
                        if api_info and kind.startswith(b"application/json") and message.get("status") == 200:
                            page["start"], page["body"] = message, b""
                            page["rewrite"] = functools.partial(_without_endpoints, names=self.admin_endpoints)
                            return
                elif message["type"] == "http.response.body" and page:
                    page["body"] += message.get("body", b"")
                    if message.get("more_body"):
                        return
                    body = page["rewrite"](page["body"])
                    headers = [(k, v) for k, v in page["start"]["headers"] if k.lower() != b"content-length"]
                    await send({**page["start"], "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                    message = {"type": "http.response.body", "body": body}
                await send(message)

            await self.app(scope, receive, send_secure)
        finally:
            CLIENT.reset(ctx)


def middleware(store: Any, policy: SecurityPolicy, *, admin_endpoints: tuple[str, ...] = ()
               ) -> tuple[Any, Callable[[str, str], Any]]:
    """(the Starlette ``Middleware`` entry for ``app_kwargs``, the ``auth`` callable) sharing one throttle.
    ``admin_endpoints`` (api names such as ``/export``) are left out of the API description non-admins read."""
    from starlette.middleware import Middleware

    def unlocked_at(user: str) -> float | None:
        t = store.unlocked_at(user)
        return None if t is None else t.timestamp()

    throttle = LoginThrottle(policy.max_failures, policy.lockout_seconds, unlocked_at=unlocked_at)
    sessions = Sessions(store, policy.session_hours)
    return (Middleware(SecurityMiddleware, policy=policy, sessions=sessions, throttle=throttle, store=store,
                       admin_endpoints=admin_endpoints), guarded_auth(store, throttle))
