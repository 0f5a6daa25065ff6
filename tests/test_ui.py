"""The annotation web app, served by ``align annotate serve`` as users run it: login, the annotator's
page in headless Chromium (mouse, keyboard, undo, inert model output), the admin tab, and the API
through ``gradio_client``; an unauthenticated client gets nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO
from sqlalchemy import text

from data.store import AnnotationStore, FunctionAnnotator, Judgement, LeasedTask
from ui.render import render_conversation, render_response

XSS_A = '<img src=x onerror="window.__xss=1;alert(1)"> look, an image'
XSS_B = "<script>window.__xss=2;alert(2)</script> ${window.__xss=3} {{constructor.constructor('window.__xss=4')()}}"


# -- rendering (no server) -------------------------------------------------------------------------


def leased(prompt, a="first answer", b="second answer", swapped=False) -> LeasedTask:
    import datetime as dt

    return LeasedTask("tok", 1, "u1", 1, prompt, a, b, None, None, None, 1, swapped, dt.datetime.now(dt.UTC))


def test_rendering_escapes_everything_from_the_model():
    t = leased([{"role": "user", "content": "<b>hi</b>"}], XSS_A, XSS_B)
    left, right = render_response(t, "left"), render_response(t, "right")
    assert "<img" not in left and "&lt;img src=x onerror=&quot;window.__xss=1;alert(1)&quot;&gt;" in left
    assert "<script>" not in right and "&lt;script&gt;" in right
    assert "${" not in right and "{{" not in right  # no template syntax survives either
    assert "&lt;b&gt;hi&lt;/b&gt;" in render_conversation(t)


def test_rendering_shows_the_conversation_and_the_randomised_sides():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A joke?"}]
    t = leased(conv, swapped=True)
    html = render_conversation(t)
    assert ([html.index(s) for s in ("Be brief.", "Hi", "Hello!", "A joke?")]
            == sorted(html.index(s) for s in ("Be brief.", "Hi", "Hello!", "A joke?")))
    assert html.count("class='turn") == 4 and "turn user final" in html
    assert "second answer" in render_response(t, "left") and "Response A" in render_response(t, "left")
    assert "first answer" in render_response(t, "right")
    assert "Nothing left" in render_conversation(None)


# -- the label form (no server) -----------------------------------------------------------------------


@pytest.mark.parametrize("swapped", [False, True], ids=["shown-in-order", "swapped"])
def test_the_form_covers_every_label_field_and_round_trips_a_label(swapped):
    """Each of Judgement's fields is set by exactly one control of ui.form.FORM, whatever the left/right order; a
    saved label shown in the form comes back unchanged; what the page never offers is refused."""
    from data.store.label import JUDGEMENT_FIELDS
    from ui import form

    t = leased([{"role": "user", "content": "q"}], swapped=swapped)
    keys = [k for c in form.FORM for k in c.to_label(c.blank, t)]
    assert sorted(keys) == sorted(JUDGEMENT_FIELDS)
    j = Judgement(chosen="B", strength="slightly_better", safe_a=True, safe_b=False, both_bad=True, comment="meh")
    values = form.shown(j, t)
    assert values["choice"] == ("A" if swapped else "B")  # B shows on the left when swapped
    assert (values["safe_a"], values["safe_b"]) == (("unsafe", "safe") if swapped else ("safe", "unsafe"))
    assert form.judgement(values, t) == j
    assert form.problems(values) is None
    assert form.problems(form.blank()) == ("Please choose which response is better, how much better, safety of response A, "
                                           "safety of response B.")
    assert form.problems({**values, "choice": "C"}) == "Unknown choice."


def test_a_control_added_to_the_form_reaches_the_page_and_the_api(monkeypatch, tmp_path):
    """The annotation-field recipe, walked on the page: one Control appended to FORM is laid out, is an input of
    /submit (after the token, in FORM's order), is an output of every action, and its value reaches the Judgement."""
    import gradio as gr

    import ui.app
    from data.store import AnnotationStore
    from ui import form

    extra = form.Control("shouty", "", lambda: gr.Textbox(label="Shout", elem_id="shouty"),
                         lambda v, t: {"comment": (v or "").upper() or None}, lambda j, t: (j.comment or "").lower())
    # a stand-in for a new field: it writes Judgement's comment, so the comment control must give that way
    shipped = tuple(c for c in form.FORM if c.key != "comment")
    for mod in (form, ui.app):
        monkeypatch.setattr(mod, "FORM", (*shipped, extra))
        monkeypatch.setattr(mod, "KEYS", tuple(c.key for c in (*shipped, extra)))
    monkeypatch.setattr(ui.app, "CONTROLS", {c.key: c for c in (*shipped, extra)})
    demo = ui.app.build_app(AnnotationStore(f"sqlite:///{tmp_path / 'a.db'}"))
    submit = next(fn for fn in demo.fns.values() if fn.api_name == "submit")
    ids = [b.elem_id for b in submit.inputs]
    assert ids == ["lease-token", "choice", "strength", "safe-a", "safe-b", "both-bad", "shouty"]
    assert "shouty" in [b.elem_id for b in submit.outputs] and "comment" not in ids
    t = leased([{"role": "user", "content": "q"}])
    got = form.judgement({"choice": "A", "strength": "better", "safe_a": "safe", "safe_b": "safe", "shouty": "hey"}, t)
    assert got.comment == "HEY" and form.shown(got, t)["shouty"] == "hey"


# -- a served app ----------------------------------------------------------------------------------


def _log_in(page: Any, user: str, *, admin: bool = False) -> None:
    """Log in through the page's form (password: '<user>-password') and wait for the first task (an admin's
    page: for the note that admins get a task only when they ask)."""
    page.locator("input[type=text]").fill(user)
    page.locator("input[type=password]").fill(f"{user}-password")
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#status:has-text('Get a task')" if admin else "#context .conv", timeout=60_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(root: Path, db: str, *extra: str) -> tuple[subprocess.Popen, str, Any]:
    """``align annotate serve`` in ``root`` on a free port; returns (process, url, log file)."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "serve.log", "w")  # noqa: SIM115 - closed by the fixture
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "annotate", "serve", "--db", db, "--port", str(port), *extra],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((root / "serve.log").read_text())
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start:\n" + (root / "serve.log").read_text())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """``align annotate serve`` on a fresh database: alice and bob annotate, root is an admin."""
    root = tmp_path_factory.mktemp("ui")
    db = f"sqlite:///{root}/ann.db"
    store = AnnotationStore(db)
    for name, role in (("alice", "annotator"), ("bob", "annotator"), ("root", "admin")):
        store.add_user(name, role=role, password=f"{name}-password")
    # round 0 comes first: every annotator starts with the task whose responses carry markup
    store.queue(0, [{"id": "xss", "prompt": "Show me <b>bold</b> & <i>more</i>", "response_a": XSS_A, "response_b": XSS_B,
                     "labels": 5}])
    store.queue(1, [{"id": f"t{i}", "prompt": [{"role": "user", "content": f"Question {i}?"},
                                                {"role": "assistant", "content": f"Earlier answer {i}."},
                                                {"role": "user", "content": f"Follow-up {i}?"}],
                     "response_a": f"Reply A{i}", "response_b": f"Reply B{i}", "category": "helpfulness"} for i in range(8)])
    seed = FunctionAnnotator("sim:seed", lambda t: Judgement(chosen="A", strength="better", safe_a=True, safe_b=False))
    assert store.label_with(seed, round=0) == 1  # something to export in round 0 whatever runs first
    proc, url, log = _serve(root, db, "--export-dir", str(root / "exports"), "--guidelines",
                            str(REPO / "configs" / "guidelines.md"))
    yield {"url": url, "store": store, "root": root}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    store.close()


def test_unauthenticated_requests_get_no_data(app):
    url = app["url"]
    for path in ("config", "gradio_api/info", "gradio_api/openapi.json"):
        r = httpx.get(url + path)
        assert r.status_code == 401, path
        assert "Reply A" not in r.text and "xss" not in r.text
    for path in ("gradio_api/call/load", "gradio_api/call/submit", "gradio_api/queue/join"):
        r = httpx.post(url + path, json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert r.status_code == 401, path
    page = httpx.get(url)
    assert page.status_code == 200 and "Reply A" not in page.text and "Follow-up" not in page.text
    assert httpx.post(url + "login", data={"username": "alice", "password": "wrong"}).status_code == 400
    assert httpx.post(url + "login", data={"username": "alice", "password": "alice-password"}).status_code == 200


@pytest.mark.browser
def test_annotator_labels_with_mouse_and_keyboard_and_undoes(app, chromium):
    store: AnnotationStore = app["store"]
    page = chromium.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(app["url"])
    _log_in(page, "alice")

    def uid() -> str:
        return page.locator("#context .conv").get_attribute("data-task")

    def wait_for_new_task(old: str) -> str:
        page.wait_for_function(f"(document.querySelector('#context .conv') || {{dataset: {{}}}}).dataset.task !== '{old}'",
                               timeout=30_000)
        return uid()

    def shown(side: str) -> str:
        return page.locator(f"#{side} .text").inner_text()

    # 1. the task with markup in every field: shown as text, nothing runs
    assert uid() == "xss"
    assert {shown("left"), shown("right")} == {XSS_A, XSS_B}
    assert "Show me <b>bold</b> & <i>more</i>" in page.locator("#context").inner_text()
    assert page.locator("#context b, #context i, #left img, #right img, #left script, #right script").count() == 0
    assert page.evaluate("window.__xss") is None and dialogs == []
    assert page.get_by_role("tab", name="Admin").count() == 0  # annotators have no admin tab
    page.get_by_text("Guidelines", exact=True).click()
    assert page.get_by_text("Negligibly better / unsure").first.is_visible()

    # label it with the mouse: prefer what is shown on the left
    expect_1 = {"xss": ("A" if shown("left") == XSS_A else "B")}
    page.locator("#choice").get_by_text("A", exact=True).click()
    page.locator("#strength").get_by_text("Better", exact=True).click()
    page.locator("#safe-a").get_by_text("Safe", exact=True).click()
    page.locator("#safe-b").get_by_text("Unsafe", exact=True).click()
    page.locator("#submit-btn").click()
    second = wait_for_new_task("xss")
    assert "Saved label" in page.locator("#status").inner_text()
    assert page.evaluate("window.__xss") is None and dialogs == []

    # 2. keyboard only: B, significantly better, A unsafe, B safe, Enter
    left_2 = shown("left")
    assert "Follow-up" in page.locator("#context").inner_text() and "Earlier answer" in page.locator("#context").inner_text()
    page.locator("#progress").click()
    for key in ("b", "1", "w", "o"):
        page.keyboard.press(key)
    assert page.locator("#choice input:checked").get_attribute("value") == "B"
    assert page.locator("#strength input:checked").get_attribute("value") == "significantly_better"
    page.keyboard.press("Enter")
    third = wait_for_new_task(second)
    assert "done today: 2" in page.locator("#progress").inner_text()

    # 3. mixed: keys for the choice, mouse for safety, a comment submitted with Ctrl+Enter
    page.locator("#progress").click()
    page.keyboard.press("a")
    page.keyboard.press("4")
    page.locator("#safe-a").get_by_text("Safe", exact=True).click()
    page.locator("#safe-b").get_by_text("Safe", exact=True).click()
    page.locator("#comment textarea, #comment input").first.fill("both fine")
    page.locator("#comment textarea, #comment input").first.press("Control+Enter")
    fourth = wait_for_new_task(third)

    # a refused action: one inline message, and the form stays usable (no overlay over the radios)
    page.locator("#submit-btn").click()
    page.wait_for_selector("#status:has-text('Please choose')", timeout=30_000)
    assert page.locator("#status").inner_text().count("Please choose") == 1 and uid() == fourth
    page.locator("#choice").get_by_text("B", exact=True).click(timeout=5_000)
    assert page.locator("#choice input:checked").get_attribute("value") == "B"
    page.locator("#skip-btn").click()  # skipping without a reason: refused too
    page.wait_for_selector("#status:has-text('reason for skipping')", timeout=30_000)
    page.locator("#strength").get_by_text("Better", exact=True).click(timeout=5_000)
    assert page.locator("#choice input:checked").get_attribute("value") == "B"  # nothing was reset

    # undo the last submission: the first click only asks; the second gives task 3 back
    page.locator("#undo-btn").click()
    page.wait_for_selector("#status:has-text('Confirm undo')", timeout=30_000)
    assert uid() == fourth and len([r for r in store.label_records() if r.annotator == "alice"]) == 3
    page.locator("#undo-btn").click()
    assert wait_for_new_task(fourth) == third
    assert "Undid your last label" in page.locator("#status").inner_text()
    with store.engine.connect() as c:
        status = c.execute(text("select a.status from assignments a join tasks t on t.id = a.task_id join "
                                "users u on u.id = a.user_id where t.uid = :uid and u.name = 'alice'"),
                           {"uid": third}).scalar_one()
    assert status == "leased"

    # the focus is still on Undo: label the returned task with keys and press Enter -> it submits, never undoes again
    assert page.evaluate("document.activeElement && document.activeElement.id") == "undo-btn"
    for key in ("a", "2", "q", "o"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    wait_for_new_task(third)
    assert "Saved label" in page.locator("#status").inner_text()

    recs = {r.task_uid: r for r in store.label_records() if r.annotator == "alice"}
    assert set(recs) == {"xss", second, third}  # the earlier labels kept, task 3 labelled again
    assert recs[third].strength == "better" and not recs[third].comment
    r1, r2 = recs["xss"], recs[second]
    assert r1.chosen == expect_1["xss"] and r1.strength == "better"
    assert (r1.safe_a, r1.safe_b) == ((True, False) if not r1.swapped else (False, True))  # shown left safe, right unsafe
    true_left_2 = "A" if left_2.startswith("Reply A") else "B"
    assert r2.chosen == ("B" if true_left_2 == "A" else "A")  # pressed b = the right-hand side
    assert r2.strength == "significantly_better"
    assert (r2.safe_a, r2.safe_b) == ((False, True) if true_left_2 == "A" else (True, False))
    with store.engine.connect() as c:
        undo = c.execute(text("select detail from events e join users u on u.id = e.user_id "
                              "where action = 'undo' and u.name = 'alice'")).scalar_one()
    undone = json.loads(undo)
    assert ((undone["strength"], undone["comment"], undone["safe_a"], undone["safe_b"])
            == ("negligibly_better", "both fine", True, True))


@pytest.mark.browser
def test_admin_tab_shows_stats_and_exports(app, chromium):
    page = chromium.new_page()
    page.goto(app["url"])
    _log_in(page, "root", admin=True)
    page.get_by_role("tab", name="Admin").click()
    page.wait_for_selector("#admin-stats table", timeout=30_000)
    stats = page.locator("#admin-stats").inner_text()
    assert "sim:seed" in stats and "Krippendorff" in stats and "Safety bins" in stats
    page.locator("#admin-round input").click()
    page.get_by_role("option", name="0", exact=True).click()
    page.locator("#export-policy").get_by_text("Every label", exact=True).click()  # a majority could be a tie
    page.locator("#export-btn").click()
    page.wait_for_selector("#export-status:has-text('Wrote')", timeout=30_000)
    assert "version 1, policy all" in page.locator("#export-status").inner_text()
    path = app["root"] / "exports" / "round-0" / "comparisons-v1.jsonl"
    assert path.exists()


def test_api_through_gradio_client_checks_user_and_role(app):
    from gradio_client import Client

    store: AnnotationStore = app["store"]
    bob = Client(app["url"], auth=("bob", "bob-password"), verbose=False, analytics_enabled=False)
    out = bob.predict(api_name="/load")
    token = out[3]
    task = store.task_for(token, "bob")
    res = bob.predict(token, "B", "slightly_better", "safe", "safe", True, "via API", api_name="/submit")
    assert res[12].startswith("Saved label #") and res[3] != token
    [rec] = [r for r in store.label_records() if r.annotator == "bob"]
    assert rec.task_uid == task.uid and rec.chosen == task.true_choice("right") and rec.both_bad and rec.comment == "via API"
    retry = bob.predict(token, "A", "better", "safe", "safe", False, "", api_name="/submit")  # e.g. a second tab
    assert retry[12] == f"Already saved as label #{rec.label_id} (submitted twice)." and retry[3] == res[3]
    assert len([r for r in store.label_records() if r.annotator == "bob"]) == 1
    with pytest.raises(Exception, match="Admins only"):
        bob.predict("all", api_name="/admin_stats")
    with pytest.raises(Exception, match="Admins only"):
        bob.predict("1", "majority", api_name="/export")
    n_labels = len(store.label_records())
    refused = bob.predict(res[3], None, None, None, None, False, "", api_name="/submit")  # refusals answer inline
    assert refused[12] == ("⚠️ Please choose which response is better, how much better, safety of response A, "
                           "safety of response B.")
    alice_token = store.next_task("alice").token
    refused = bob.predict(alice_token, "A", "better", "safe", "safe", False, "", api_name="/submit")
    assert refused[12].startswith("⚠️") and "not assigned to 'bob'" in refused[12]
    assert len(store.label_records()) == n_labels  # nothing stored
    admin = Client(app["url"], auth=("root", "root-password"), verbose=False, analytics_enabled=False)
    assert "bob" in admin.predict("all", api_name="/admin_stats")[0]
    # "my recent labels": reopen bob's label (shown as he made it) and change it; the earlier values go to the audit log
    shown = bob.predict(str(rec.label_id), api_name="/change_label")
    assert shown[3] == f"edit:{rec.label_id}" and shown[12].startswith(f"Changing your label #{rec.label_id}")
    assert list(shown[4:10]) == ["B", "slightly_better", "safe", "safe", True, "via API"]
    changed = bob.predict(shown[3], "A", "better", "safe", "unsafe", False, "changed", api_name="/submit")
    assert changed[12] == f"Changed your label #{rec.label_id}."
    [rec2] = [r for r in store.label_records() if r.annotator == "bob"]
    assert ((rec2.label_id, rec2.chosen, rec2.strength, rec2.comment)
            == (rec.label_id, task.true_choice("left"), "better", "changed"))
    assert (rec2.safe_a, rec2.safe_b) == task.true_safety(True, False)
    assert len(store.label_records()) == n_labels
    assert bob.predict(None, api_name="/change_label")[12] == "⚠️ Pick one of your recent labels first."
    with pytest.raises(Exception, match="not in the list of choices"):  # only the annotator's own labels are offered
        bob.predict("999999", api_name="/change_label")
    # undo takes two calls: the first only asks, the second gives bob's task back
    asked = bob.predict(api_name="/undo")
    assert "Confirm undo" in asked[12] and len(store.label_records()) == n_labels
    undone = bob.predict(api_name="/undo")
    assert undone[12].startswith("Undid your last label") and len(store.label_records()) == n_labels - 1
    assert bob.predict(api_name="/undo")[12].startswith("Undo deletes")
    assert bob.predict(api_name="/undo")[12] == "⚠️ Nothing to undo."


def test_exports_are_for_admins_only(app):
    """An annotator cannot GET an export (every label, annotator name and comment) through the file route;
    the admin who exported gets the file from the app."""
    from gradio_client import Client

    admin = Client(app["url"], auth=("root", "root-password"), verbose=False, analytics_enabled=False)
    msg, downloaded = admin.predict("0", "all", api_name="/export")
    assert msg.startswith("Wrote")
    [export] = [p for p in (app["root"] / "exports" / "round-0").glob("comparisons-v*.jsonl") if f"`{p}`" in msg]
    assert Path(downloaded).read_bytes() == export.read_bytes()  # the admin's download is the export
    alice = httpx.Client(base_url=app["url"])
    assert alice.post("login", data={"username": "alice", "password": "alice-password"}).status_code == 200
    config = alice.get("config")
    assert config.status_code == 200  # logged in
    assert config.json()["footer_links"] == ["settings"]  # no "Use via API" link for annotators
    secret = export.read_text().splitlines()[0][:40]
    rel = export.relative_to(app["root"])  # the server runs in app["root"]
    for path in (f"gradio_api/file={export}", f"gradio_api/file={rel}", f"file={export}", f"gradio_api/file={export.parent}"):
        r = alice.get(path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert secret not in r.text


@pytest.mark.browser
def test_an_annotators_browser_cannot_open_an_export(app, chromium):
    from gradio_client import Client

    admin = Client(app["url"], auth=("root", "root-password"), verbose=False, analytics_enabled=False)
    msg, _ = admin.predict("0", "all", api_name="/export")
    [export] = [p for p in (app["root"] / "exports" / "round-0").glob("comparisons-v*.jsonl") if f"`{p}`" in msg]
    secret = export.read_text().splitlines()[0][:40]
    app["store"].add_user("cara", password="cara-password")  # an annotator of her own: no task needed to be logged in
    page = chromium.new_page()
    page.goto(app["url"])
    page.locator("input[type=text]").fill("cara")
    page.locator("input[type=password]").fill("cara-password")
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#progress", timeout=60_000)
    for path in (f"gradio_api/file={export}", f"gradio_api/file={export.relative_to(app['root'])}"):
        response = page.goto(app["url"] + path)
        assert response is not None and response.status in (403, 404), (path, response and response.status)
        assert secret not in page.content()
    page.close()


# -- sessions, login throttling, cookies, origins (ui/security.py) -------------------------------------------

SESSION_SECONDS = 12.0


@pytest.fixture(scope="module")
def secure_app(tmp_path_factory):
    """A server with short sessions (12 s), 3 failed logins allowed per name or address, a 6 s lockout and one
    allowed extra origin."""
    root = tmp_path_factory.mktemp("secure")
    db = f"sqlite:///{root}/ann.db"
    store = AnnotationStore(db)
    for name in ("dora", "erin", "fay", "hana", "jill", "kim", "lea"):
        store.add_user(name, password=f"{name}-password")
    store.queue(1, [{"id": f"s{i}", "prompt": f"Q{i}?", "response_a": f"A{i}", "response_b": f"B{i}"} for i in range(4)])
    proc, url, log = _serve(root, db, "--session-hours", str(SESSION_SECONDS / 3600), "--max-login-failures", "3",
                            "--login-lockout-seconds", "6", "--allowed-origin", "https://proxy.example.org")
    yield {"url": url, "store": store, "root": root, "db": db}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    store.close()


def _login(url: str, user: str, password: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=url)
    return client, client.post("login", data={"username": user, "password": password})


def test_cookies_are_samesite_lax_and_other_origins_are_refused(secure_app):
    url = secure_app["url"]
    client, r = _login(url, "dora", "dora-password")
    cookies = r.headers.get_list("set-cookie")
    assert r.status_code == 200 and len(cookies) == 2
    assert all("samesite=lax" in c.lower() and "samesite=none" not in c.lower() for c in cookies)
    join = {"data": [], "fn_index": 0, "session_hash": "x"}
    evil = client.post("gradio_api/queue/join", json=join, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.text
    assert client.post("login", data={"username": "dora", "password": "dora-password"},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    for ok in ("https://proxy.example.org", url.rstrip("/")):  # the allowed proxy, the app itself
        assert client.post("gradio_api/queue/join", json=join, headers={"Origin": ok}).status_code != 403, ok
    assert client.get("config", headers={"Origin": "https://evil.example"}).status_code == 200  # reading: CORS decides


def test_login_page_carries_the_refusal_script_once(secure_app):
    from ui.security import _with_login_js

    page = httpx.get(secure_app["url"])
    assert page.status_code == 200 and page.text.count('id="align-login-refusals"') == 1
    assert int(page.headers["content-length"]) == len(page.content) and "</head>" in page.text
    assert _with_login_js(page.content) == page.content  # never twice
    assert _with_login_js(b"<p>no head</p>") == b"<p>no head</p>"


def test_password_change_and_deactivation_end_open_sessions(secure_app):
    url, db = secure_app["url"], secure_app["db"]
    dora, r = _login(url, "dora", "dora-password")
    assert r.status_code == 200 and dora.get("config").status_code == 200
    res = subprocess.run([sys.executable, "-m", "alignment.cli", "annotate", "passwd", "dora", "--db", db, "--password-stdin"],
                         input="dora-new-password\n", capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    time.sleep(1.2)  # the server caches a user's credential for 1 s
    assert dora.get("config").status_code == 401  # the old session is over
    dora, r = _login(url, "dora", "dora-new-password")
    assert r.status_code == 200 and dora.get("config").status_code == 200
    res = subprocess.run([sys.executable, "-m", "alignment.cli", "annotate", "deactivate", "dora", "--db", db],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "deactivated" in res.stdout, res.stderr
    time.sleep(1.2)
    assert dora.get("config").status_code == 401
    assert _login(url, "dora", "dora-new-password")[1].status_code == 400  # and no new one
    subprocess.run([sys.executable, "-m", "alignment.cli", "annotate", "activate", "dora", "--db", db], check=True, cwd=REPO,
                   capture_output=True)


def test_sessions_expire(secure_app):
    erin, r = _login(secure_app["url"], "erin", "erin-password")
    assert r.status_code == 200 and erin.get("config").status_code == 200
    time.sleep(SESSION_SECONDS / 2)
    assert erin.get("config").status_code == 200
    time.sleep(SESSION_SECONDS / 2 + 1)
    assert erin.get("config").status_code == 401
    assert _login(secure_app["url"], "erin", "erin-password")[1].status_code == 200  # a fresh login works


def test_failed_logins_are_throttled_and_logged(secure_app):
    url = secure_app["url"]
    for _ in range(3):
        assert _login(url, "fay", "wrong")[1].status_code == 400
    locked = _login(url, "fay", "fay-password")[1]  # the right password, but the name is locked
    assert locked.status_code == 429 and "Too many failed logins" in locked.json()["detail"]
    time.sleep(6.5)
    assert _login(url, "fay", "fay-password")[1].status_code == 200  # the lockout is over
    # a forwarded header from an untrusted peer (here 127.0.0.1, which uvicorn trusts by default) changes nothing:
    # guesses "from 10.9.9.9" lock the pair (fay, 127.0.0.1), and 10.9.9.9 is never logged
    for _ in range(3):
        assert httpx.post(url + "login", data={"username": "fay", "password": "wrong"},
                          headers={"X-Forwarded-For": "10.9.9.9"}).status_code == 400
    assert _login(url, "fay", "fay-password")[1].status_code == 429
    time.sleep(6.5)
    assert _login(url, "fay", "fay-password")[1].status_code == 200
    log = (secure_app["root"] / "serve.log").read_text()
    assert log.count("failed login: user='fay' address=127.0.0.1") == 6
    assert "login refused, too many failures: user='fay'" in log
    assert "10.9.9.9" not in log


def _fill_login(page: Any, user: str, password: str) -> None:
    page.locator("input[type=text]").fill(user)
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


@pytest.mark.browser
def test_browser_session_ends_on_password_change_and_on_expiry(secure_app, chromium):
    url, db = secure_app["url"], secure_app["db"]
    page = chromium.new_page()
    page.goto(url)
    _log_in(page, "hana")
    res = subprocess.run([sys.executable, "-m", "alignment.cli", "annotate", "passwd", "hana", "--db", db, "--password-stdin"],
                         input="hana-new-password\n", capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    time.sleep(1.2)  # the server caches a user's credential for 1 s
    page.reload()  # the open page's session is over: the login form, not the task
    page.wait_for_selector("input[type=password]", timeout=30_000)
    assert page.locator("#context .conv").count() == 0
    _fill_login(page, "hana", "hana-password")  # the old password is refused
    page.get_by_text("Incorrect Credentials").wait_for(timeout=10_000)
    _fill_login(page, "hana", "hana-new-password")
    page.wait_for_selector("#context .conv", timeout=60_000)
    time.sleep(SESSION_SECONDS + 1)  # the session expires
    page.reload()
    page.wait_for_selector("input[type=password]", timeout=30_000)
    assert page.locator("#context .conv").count() == 0
    page.close()


@pytest.mark.browser
def test_browser_throttled_login_says_why(secure_app, chromium):
    page = chromium.new_page()
    page.goto(secure_app["url"])
    page.wait_for_selector("input[type=password]", timeout=30_000)
    for _ in range(3):
        _fill_login(page, "jill", "wrong")
        page.get_by_text("Incorrect Credentials").wait_for(timeout=10_000)
        time.sleep(0.3)
    _fill_login(page, "jill", "jill-password")  # the right password while the name is locked out
    alert = page.locator("#login-refused")
    alert.wait_for(timeout=10_000)
    assert alert.get_attribute("role") == "alert" and "Too many failed logins; try again in" in alert.inner_text()
    assert page.locator("#context .conv").count() == 0
    time.sleep(6.5)  # the lockout ends; the same form logs in
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#context .conv", timeout=60_000)
    page.close()


# -- the annotator's page fits the screen ----------------------------------------------------------------------

TYPICAL = "Here is a careful, step-by-step answer with an example and a caveat. " * 18  # ~1,250 characters


@pytest.fixture(scope="module")
def layout_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    db = f"sqlite:///{root}/ann.db"
    store = AnnotationStore(db)
    store.add_user("gus", password="gus-password")
    store.queue(1, [{"id": "typical", "prompt": "How do I plan a week of healthy dinners on a budget?",
                     "response_a": "A: " + TYPICAL, "response_b": "B: " + TYPICAL[::-1]}])
    proc, url, log = _serve(root, db)
    yield {"url": url}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    store.close()


@pytest.mark.browser
@pytest.mark.parametrize("width,height,touch", [(1280, 800, False), (390, 844, True)], ids=["laptop", "phone"])
def test_annotator_page_fits_the_screen(layout_app, chromium, width, height, touch):
    """The choice, the strength and Submit are on screen without scrolling; long responses scroll inside their panes;
    no keyboard hint on a touch screen. ALIGN_UI_SCREENSHOTS=DIR saves what the test saw."""
    ctx = chromium.new_context(viewport={"width": width, "height": height}, has_touch=touch, is_mobile=touch)
    page = ctx.new_page()
    page.goto(layout_app["url"])
    _log_in(page, "gus")
    page.wait_for_timeout(500)  # let the layout settle

    def on_screen(selector: str) -> bool:
        box = page.locator(selector).first.bounding_box()
        return (box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height and box["x"] >= 0
                and box["x"] + box["width"] <= width)

    if os.environ.get("ALIGN_UI_SCREENSHOTS"):
        out = Path(os.environ["ALIGN_UI_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"annotate-{width}x{height}.png"))
    for selector in ("#choice", "#strength", "#submit-btn"):
        assert on_screen(selector), f"{selector} is not on screen at {width}x{height}"
    for pane in ("#left .resp", "#right .resp"):
        scroll_h, client_h = page.evaluate(f"(() => {{ const r = document.querySelector('{pane}'); return [r.scrollHeight, "
                                           f"r.clientHeight]; }})()")
        # the pane scrolls, the page does not grow
        assert scroll_h > client_h and client_h <= 0.35 * height, (pane, scroll_h, client_h)
    a_box, b_box = page.locator("#left .resp").bounding_box(), page.locator("#right .resp").bounding_box()
    if touch:
        assert b_box["y"] >= a_box["y"] + a_box["height"] - 1  # stacked on a phone
    else:
        assert abs(a_box["y"] - b_box["y"]) < 2 and b_box["x"] > a_box["x"] + a_box["width"] - 1  # side by side
    assert page.locator(".keys").is_visible() is (not touch)
    # the controls work from where they are: choose with a tap or click, without scrolling first
    page.locator("#choice").get_by_text("B", exact=True).click(timeout=5_000)
    assert page.locator("#choice input:checked").get_attribute("value") == "B"
    ctx.close()


@pytest.mark.browser
def test_an_admin_opening_the_page_holds_no_task_until_asking(app, chromium):
    """Opening the page used to lease a task for 30 minutes: an admin who only looked at progress held the
    round's last task while both annotators saw nothing to label."""
    store: AnnotationStore = app["store"]
    page = chromium.new_page()
    page.goto(app["url"])
    _log_in(page, "root", admin=True)
    assert [h for h in store.leases() if h["user"] == "root"] == []
    page.locator("#next-btn").click()
    page.wait_for_selector("#context .conv", timeout=30_000)
    held = [h for h in store.leases() if h["user"] == "root"]
    assert len(held) == 1 and held[0]["task"] == page.locator("#context .conv").get_attribute("data-task")
    assert store.release_leases(user="root") == 1
    page.close()


def _login_when_unlocked(url: str, user: str, password: str) -> tuple[httpx.Client, httpx.Response]:
    """A login that waits out an address lockout left by an earlier test (same client address)."""
    deadline = time.time() + 10
    while True:
        client, r = _login(url, user, password)
        if r.status_code != 429 or time.time() > deadline:
            return client, r
        time.sleep(1)


def test_an_ended_session_stays_ended_whatever_the_cookie_header_looks_like(secure_app):
    """The session check used to parse only the last Cookie header with SimpleCookie, which gives up on input
    that Starlette (Gradio's parser) reads leniently: such a cookie kept an ended session alive."""
    url, store = secure_app["url"], secure_app["store"]
    shapes = ["path=/; {c}", 'x="a; {c}', "a=b c; {c}", "{{=1; {c}", "{c}\n{c}", "{c}"]  # \n: two Cookie headers
    for k, shape in enumerate(shapes):
        kim, r = _login_when_unlocked(url, "kim", f"kim-password-{k}" if k else "kim-password")
        assert r.status_code == 200, shape
        cookie = next(f"{c.name}={c.value}" for c in kim.cookies.jar if c.name.startswith("access-token-unsecure"))
        headers = [("Cookie", h) for h in shape.format(c=cookie).split("\n")]
        assert httpx.get(url + "gradio_api/login_check", headers=headers).status_code == 200, shape  # the app reads it
        store.set_password("kim", f"kim-password-{k + 1}")  # as `align annotate passwd` does: the session is over
        time.sleep(1.2)  # the server caches a user's credential for 1 s
        assert httpx.get(url + "gradio_api/login_check", headers=headers).status_code == 401, shape


def test_reactivating_an_account_revives_no_session(secure_app):
    url, db = secure_app["url"], secure_app["db"]
    lea, r = _login_when_unlocked(url, "lea", "lea-password")
    assert r.status_code == 200 and lea.get("gradio_api/login_check").status_code == 200
    for verb in ("deactivate", "activate"):  # no request in between: the session must still be over
        subprocess.run([sys.executable, "-m", "alignment.cli", "annotate", verb, "lea", "--db", db], check=True, cwd=REPO,
                       capture_output=True)
    time.sleep(1.2)
    assert lea.get("gradio_api/login_check").status_code == 401
    lea, r = _login_when_unlocked(url, "lea", "lea-password")  # a new login works
    assert r.status_code == 200 and lea.get("gradio_api/login_check").status_code == 200


def test_logout_cannot_be_triggered_from_another_site(secure_app):
    url = secure_app["url"]
    erin, r = _login_when_unlocked(url, "erin", "erin-password")
    assert r.status_code == 200
    for site in ("cross-site", "same-site"):  # a link on another site, or on another local port
        assert erin.get("logout", headers={"Sec-Fetch-Site": site}).status_code == 403
    assert erin.get("gradio_api/login_check").status_code == 200  # still logged in
    erin.get("logout", headers={"Sec-Fetch-Site": "same-origin"})  # the app's own logout works
    assert erin.get("gradio_api/login_check").status_code == 401


def test_the_login_name_is_read_from_the_browsers_multipart_form_too():
    """The browser's login page posts multipart/form-data: the throttle read no name from it, so a name's
    lockout never applied to browser logins (hidden while one address's few failures locked everyone)."""
    from ui.security import _login_name

    body = (b'--XYZ\r\nContent-Disposition: form-data; name="username"\r\n\r\njill \r\n'
            b'--XYZ\r\nContent-Disposition: form-data; name="password"\r\n\r\nwrong\r\n--XYZ--\r\n')
    assert _login_name("multipart/form-data; boundary=XYZ", body) == "jill"
    assert _login_name("application/x-www-form-urlencoded", b"username=bob&password=x") == "bob"
    assert _login_name("multipart/form-data; boundary=XYZ", b"garbage") == ""
