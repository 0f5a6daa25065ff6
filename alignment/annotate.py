"""``align annotate``: collect human preference comparisons (Llama 2, section 3.2.1).

    align annotate add-user alice --role annotator         # asks for a password (or --password-stdin)
    align annotate sample --model runs/r1/sft --prompts bundled:prompts --out pairs-r1.jsonl --round 1
    align annotate queue --round 1 --pairs pairs.jsonl --overlap 0.1 --overlap-labels 3
    align annotate serve --db sqlite:///runs/annotations.db --host 127.0.0.1 --port 7860 --guidelines configs/guidelines.md
    align annotate stats --round 1                          # progress, per annotator, agreement
    align annotate export --round 1 --out comparisons-r1.jsonl   # what the reward models train on

Every subcommand takes ``--project P`` (the database of the round project ``runs/P``; ``--root``
for another parent folder) or ``--db URL`` (default ``$ALIGN_ANNOTATION_DB`` or
``sqlite:///runs/annotations.db``; ``postgresql://user@host/db`` for a team server).

When a round waits:  ``align round status --project P`` names each task it waits for and why;
``align annotate release`` frees a task someone holds, ``set-labels`` lowers how many labels a task
needs, ``drop-task`` stops waiting for it.

``sample`` generates two responses per prompt, as Llama 2 did, from one policy at two
temperatures or from two policies (``--model-b``), with batched generation, and writes the
pairs file (and queues it with ``--round``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DB_HELP = ("database URL: sqlite:///path.db (default $ALIGN_ANNOTATION_DB or sqlite:///runs/annotations.db) "
           "or postgresql://user@host/db")


def _db_default() -> str:
    # = data.store.DEFAULT_DB (not imported: --help stays fast)
    return os.environ.get("ALIGN_ANNOTATION_DB", "sqlite:///runs/annotations.db")


def _store(url: str, **kw: Any) -> Any:
    from data.store import AnnotationStore

    return AnnotationStore(url, **kw)


def _read_password(a: argparse.Namespace) -> str:
    if a.password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise SystemExit("align annotate: no terminal to ask for a password; pipe it with --password-stdin")
        pw = getpass.getpass(f"password for {a.name}: ")
        if getpass.getpass("again: ") != pw:
            raise SystemExit("align annotate: the passwords differ; nothing was changed")
    if len(pw) < 8:
        raise SystemExit("align annotate: a password needs at least 8 characters; nothing was changed")
    return pw


# ---------------------------------------------------------------------------------------------
# subcommands


def cmd_add_user(a: argparse.Namespace) -> int:
    pw = _read_password(a) if a.kind == "human" else None
    info = _store(a.db).add_user(a.name, role=a.role, kind=a.kind, password=pw)
    print(f"added {info.kind} user {info.name!r} ({info.role})")
    return 0


def cmd_passwd(a: argparse.Namespace) -> int:
    _store(a.db).set_password(a.name, _read_password(a))
    print(f"password of {a.name!r} changed")
    return 0


def cmd_set_active(a: argparse.Namespace) -> int:
    active = a.cmd == "activate"
    _store(a.db).set_active(a.name, active)
    print(f"{a.name!r} {'activated' if active else 'deactivated: their sessions end and they cannot log in; their labels stay'}")
    return 0


def cmd_unlock(a: argparse.Namespace) -> int:
    _store(a.db).unlock(a.name, by=getpass.getuser())
    print(f"login locks of {a.name!r} cleared (a running server sees it within a second)")
    return 0


def cmd_round_state(a: argparse.Namespace) -> int:
    store = _store(a.db)
    if a.cmd == "close-round":
        store.close_round(a.round)
        print(f"round {a.round} closed: no more labels, undos or changes in it")
    else:
        store.reopen_round(a.round)
        print(f"round {a.round} reopened")
    return 0


def cmd_users(a: argparse.Namespace) -> int:
    for u in _store(a.db).users():
        print(f"{u.name}\t{u.role}\t{u.kind}\t{'active' if u.active else 'inactive'}")
    return 0


def cmd_queue(a: argparse.Namespace) -> int:
    from data.store import AnnotationError

    store = _store(a.db)
    if a.max_response_kb is not None and a.max_response_kb <= 0:
        raise AnnotationError(f"--max-response-kb must be > 0, got {a.max_response_kb}")
    max_bytes = None if a.max_response_kb is None else int(a.max_response_kb * 1024)
    n = store.queue_file(a.round, a.pairs, labels=a.labels, overlap=a.overlap, overlap_labels=a.overlap_labels, seed=a.seed,
                         max_response_bytes=max_bytes)
    print(f"queued {n} tasks in round {a.round}; the round needs {store.missing_labels(a.round)} more labels")
    warning = store.team_warning(a.round)
    if warning:
        print(f"align annotate queue: warning: {warning}", file=sys.stderr)
    return 0


def cmd_waits(a: argparse.Namespace) -> int:
    waits = _store(a.db).task_waits(a.round)
    if not waits:
        print(f"round {a.round}: no task needs labels")
    for w in waits:
        print(f"{w.uid}\t{w.why()}")
    return 0


def cmd_release(a: argparse.Namespace) -> int:
    n = _store(a.db).release_leases(user=a.user, round=a.round, task=a.task, by=getpass.getuser())
    print(f"released {n} lease(s): the task(s) went back to the queue")
    return 0


def cmd_set_labels(a: argparse.Namespace) -> int:
    store = _store(a.db)
    if a.cmd == "drop-task":
        kept = store.set_labels_needed(a.round, a.task, None, by=getpass.getuser())
        print(f"task {a.task!r} of round {a.round} dropped from what the round waits for (it keeps its {kept} labels)")
    else:
        store.set_labels_needed(a.round, a.task, a.labels, by=getpass.getuser())
        print(f"task {a.task!r} of round {a.round} now needs {a.labels} labels")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from foundation.runs import setup_logging
    from data.loaders import read_text_file
    from ui.app import DEFAULT_GUIDELINES, launch

    setup_logging()
    path = Path(a.guidelines) if a.guidelines else DEFAULT_GUIDELINES
    if a.guidelines and not path.is_file():
        raise FileNotFoundError(f"guidelines file {path} not found")
    guidelines = read_text_file(path) if path.is_file() else ""
    from data.store import AnnotationError

    if a.page_lease_seconds < 0 or not a.lease_minutes > 0:
        raise AnnotationError("--page-lease-seconds must be >= 0 and --lease-minutes > 0")
    store = _store(a.db, lease_seconds=a.lease_minutes * 60, sqlite_synchronous=a.sqlite_synchronous)
    if not any(u.is_admin and u.kind == "human" for u in store.users()):
        print("align annotate serve: note: no admin user yet (align annotate add-user NAME --role admin)", file=sys.stderr)
    from ui.security import SecurityPolicy

    try:
        policy = SecurityPolicy(session_hours=a.session_hours, max_failures=a.max_login_failures,
                                lockout_seconds=a.login_lockout_seconds, allowed_origins=list(a.allowed_origin),
                                max_request_bytes=int(a.max_request_kb * 1024), max_comment_chars=a.max_comment_chars,
                                max_reason_chars=a.max_skip_reason_chars, server_host=a.host)
    except ValueError as exc:  # a bad serve option: name its flag, before anything starts
        message = str(exc)
        for field, flag in (("max_request_bytes", "--max-request-kb (in bytes)"), ("max_comment_chars", "--max-comment-chars"),
                            ("max_reason_chars", "--max-skip-reason-chars"), ("session_hours", "--session-hours"),
                            ("max_failures", "--max-login-failures"), ("lockout_seconds", "--login-lockout-seconds"),
                            ("allowed origin", "--allowed-origin")):
            message = message.replace(field, flag)
        raise AnnotationError(message) from None
    launch(store, host=a.host, port=a.port, guidelines=guidelines, round=a.round, export_dir=a.export_dir,
           concurrency=a.concurrency, security=policy, forwarded_allow_ips=",".join(a.forwarded_allow_ips),
           page_hold=a.page_lease_seconds or None)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    if a.dry_run:
        plan = _store(a.db).comparisons(a.round, policy=a.policy, complete_only=a.complete_only,
                                        drop_both_bad=a.drop_both_bad)
        print(f"would write {len(plan.comparisons)} comparisons from {plan.tasks} labelled tasks (round {a.round}, "
              f"policy {a.policy}; {plan.ties_dropped} ties dropped, {plan.incomplete_skipped} incomplete skipped); "
              "nothing written, no export version used")
        return 0
    res = _store(a.db).export(a.round, a.out, out_dir=a.out_dir, policy=a.policy, complete_only=a.complete_only,
                              drop_both_bad=a.drop_both_bad, by=getpass.getuser())
    print(f"wrote {res.records} comparisons from {res.tasks} labelled tasks (round {res.round}, export version {res.version}, "
          f"policy {res.policy}; {res.ties_dropped} ties dropped, {res.incomplete_skipped} incomplete skipped) to {res.path}")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    st = _store(a.db).stats(a.round)
    if a.json:
        print(json.dumps(st, indent=2))
    else:
        from ui.render import stats_markdown  # plain Markdown text; ui.render does not import gradio

        print(stats_markdown(st))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from foundation.runs import setup_logging
    from data.loaders import DataSource, load_prompts, write_jsonl
    from data.store import read_tasks
    from data.store.sampling import sample_pairs

    setup_logging()
    out = Path(a.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    prompts = load_prompts(DataSource(path=a.prompts, limit=a.limit))
    models = [a.model, a.model_b or a.model]
    temps = [a.temperature_a, a.temperature_b]
    if models[0] == models[1] and temps[0] == temps[1] == 0:
        raise SystemExit("align annotate sample: one model at temperature 0 twice gives identical responses; "
                         "use two temperatures or --model-b")
    if a.samples < 2:
        raise SystemExit(f"align annotate sample: --samples must be >= 2 (a pair needs two responses), got {a.samples}")
    if a.pairs_per_prompt is not None and a.pairs_per_prompt < 1:
        raise SystemExit(f"align annotate sample: --pairs-per-prompt must be >= 1, got {a.pairs_per_prompt}")
    rows, dropped = sample_pairs(models, prompts, temperatures=temps, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                                 batch_size=a.batch_size, seed=a.seed, samples=a.samples, pairs_per_prompt=a.pairs_per_prompt)
    if not rows:
        raise SystemExit(f"align annotate sample: all {len(prompts)} pairs had an empty or identical response; nothing written")
    write_jsonl(out, rows)
    print(f"wrote {len(rows)} pairs to {out} ({dropped} dropped: empty or identical responses)")
    if a.round is not None:
        n = _store(a.db).queue(a.round, read_tasks(out), labels=a.labels, overlap=a.overlap, overlap_labels=a.overlap_labels,
                               seed=a.seed)
        print(f"queued {n} tasks in round {a.round}")
    return 0


# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True,
                           metavar="{add-user,queue,serve,export,stats,sample,passwd,deactivate,activate,close-round,"
                                   "reopen-round,users,waits,release,set-labels,drop-task,unlock}")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--db", default=None, help=DB_HELP)
        sp.add_argument("--project", help="a round project: use its database (runs/<project>/annotations.db or its "
                                          "annotation.db); instead of --db")
        sp.add_argument("--root", default="runs", help="parent folder of projects (with --project; default: runs)")
        sp.set_defaults(fn=fn)
        return sp

    def overlap_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--labels", type=int, default=1, help="labels each task needs (default 1)")
        sp.add_argument("--overlap", type=float, default=0.0, help="fraction of tasks labelled by several annotators, e.g. 0.1")
        sp.add_argument("--overlap-labels", type=int, default=3, help="labels an overlapping task needs (default 3)")
        sp.add_argument("--seed", type=int, default=0, help="picks which tasks overlap")

    sp = add("add-user", cmd_add_user, "add an annotator or admin (asks for the password; only a salted hash is stored)")
    sp.add_argument("name")
    sp.add_argument("--role", choices=["annotator", "admin"], default="annotator")
    sp.add_argument("--kind", choices=["human", "simulated"], default="human", help="simulated users have no password")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin (scripts)")

    sp = add("passwd", cmd_passwd, "change a user's password (their open sessions end)")
    sp.add_argument("name")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    for verb, what in (("deactivate",
                        "deactivate a user: their sessions end, they cannot log in, their leased tasks return; labels stay"),
                       ("activate", "reactivate a deactivated user")):
        sp = add(verb, cmd_set_active, what)
        sp.add_argument("name")
    sp = add("unlock", cmd_unlock, "clear a user's login locks after failed logins")
    sp.add_argument("name")
    for verb, what in (("close-round", "close a round: annotators can no longer label, undo or change labels in it"),
                       ("reopen-round", "reopen a closed round")):
        sp = add(verb, cmd_round_state, what)
        sp.add_argument("--round", type=int, required=True)

    add("users", cmd_users, "list users")

    sp = add("waits", cmd_waits, "the tasks of a round that still need labels: who could label each, who holds it")
    sp.add_argument("--round", type=int, required=True)
    sp = add("release", cmd_release, "give leased tasks back to the queue: all of a user's, or one task's")
    sp.add_argument("--user", help="release every task this user holds")
    sp.add_argument("--round", type=int, help="the task's round (with --task)")
    sp.add_argument("--task", help="release this task (its id in the pairs file)")
    sp = add("set-labels", cmd_set_labels, "change how many labels one task needs (never below the labels it has)")
    sp.add_argument("--round", type=int, required=True)
    sp.add_argument("--task", required=True, help="the task's id in the pairs file")
    sp.add_argument("--labels", type=int, required=True)
    sp = add("drop-task", cmd_set_labels, "stop waiting for one task: it keeps the labels it has and needs no more")
    sp.add_argument("--round", type=int, required=True)
    sp.add_argument("--task", required=True, help="the task's id in the pairs file")

    sp = add("queue", cmd_queue, "queue comparison tasks (prompt + two responses) for a round")
    sp.add_argument("--round", type=int, required=True)
    sp.add_argument("--pairs", required=True,
                    help="task file: JSONL rows {prompt, response_a, response_b, source_a, source_b, category, id}")
    sp.add_argument("--max-response-kb", type=float, default=32.0,
                    help="refuse a task whose response is longer than this many KiB of UTF-8 (default 32)")
    overlap_args(sp)

    sp = add("serve", cmd_serve, "serve the annotation web app")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=7860)
    sp.add_argument("--guidelines", help="Markdown shown in the Guidelines panel (default configs/guidelines.md)")
    sp.add_argument("--round", type=int, default=None, help="serve only this round (default: every round, oldest first)")
    sp.add_argument("--lease-minutes", type=float, default=30.0,
                    help="the longest one annotator holds a task unlabelled, even with the page open (default 30)")
    sp.add_argument("--page-lease-seconds", type=float, default=180.0,
                    help="a task shown on a page is held this long after the page's last sign of life (it renews every "
                         "quarter of this while open), so a page only opened, or closed, gives its task back soon "
                         "(default 180; 0: hold for the whole --lease-minutes)")
    sp.add_argument("--export-dir", default="runs/annotations/exports", help="where the admin tab's export button writes")
    sp.add_argument("--concurrency", type=int, default=16, help="requests handled at once")
    sp.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL",
                    help="FULL: a label survives a power cut; NORMAL: survives a killed server only (faster)")
    sp.add_argument("--session-hours", type=float, default=12.0, help="a login session ends after this long (default 12)")
    sp.add_argument("--max-login-failures", type=int, default=5,
                    help="failed logins for one name from one address before that is refused for a while (default 5; "
                         "an address gets 10x, a name over all addresses 4x)")
    sp.add_argument("--login-lockout-seconds", type=float, default=300.0,
                    help="how long logins are refused after too many failures")
    sp.add_argument("--forwarded-allow-ips", action="append", default=[], metavar="ADDRESS",
                    help="a reverse proxy's address whose X-Forwarded-For header names the client (repeatable); by "
                         "default no forwarded header is believed, so login throttling sees the real peer address")
    sp.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                    help="another origin (scheme://host[:port]) whose pages may call the app, e.g. a reverse proxy's; "
                         "requests from any other origin are refused (repeatable). A host NAME the app is reached by "
                         "(not an IP address or localhost) must be the --host or one of these")
    sp.add_argument("--max-request-kb", type=float, default=1024.0,
                    help="refuse a request body (an upload too) over this many KiB with HTTP 413 (default 1024)")
    sp.add_argument("--max-comment-chars", type=int, default=5000, help="the longest comment a label may carry (default 5000)")
    sp.add_argument("--max-skip-reason-chars", type=int, default=500, help="the longest skip reason (default 500)")

    sp = add("export", cmd_export, "write a round's comparisons for the reward models (never overwrites)")
    sp.add_argument("--round", type=int, required=True)
    sp.add_argument("--out", help="output file (must not exist); default <out-dir>/round-N/comparisons-v<version>.jsonl")
    sp.add_argument("--out-dir", default="runs/annotations/exports")
    sp.add_argument("--policy", choices=["majority", "weighted", "all"], default="majority",
                    help="disagreements: majority vote per task (an even split is a tie: dropped), weighted (even splits "
                         "broken by the votes' strengths: significantly 4 ... negligibly 1), or every label")
    sp.add_argument("--complete-only", action="store_true", help="only tasks that have all their labels")
    sp.add_argument("--drop-both-bad", action="store_true", help="leave out labels flagged 'both responses are bad'")
    sp.add_argument("--dry-run", action="store_true",
                    help="only say what would be exported: write nothing, use no export version")

    sp = add("stats", cmd_stats, "progress, per-annotator counts and speed, distributions, agreement")
    sp.add_argument("--round", type=int, default=None)
    sp.add_argument("--json", action="store_true")

    sp = add("sample", cmd_sample, "generate response pairs for prompts from one or two policies at two temperatures")
    sp.add_argument("--model", required=True, help="policy for response A: a built-in name, a folder or a stage output")
    sp.add_argument("--model-b", help="policy for response B (default: the same as --model)")
    sp.add_argument("--prompts", required=True, help="prompt file or bundled:prompts")
    sp.add_argument("--out", required=True, help="pairs file to write (must not exist)")
    sp.add_argument("--temperature-a", type=float, default=0.7)
    sp.add_argument("--temperature-b", type=float, default=1.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--samples", type=int, default=2,
                    help="responses per prompt, alternating A's and B's model and temperature; every two distinct ones "
                         "make a pair (K give up to K(K-1)/2)")
    sp.add_argument("--pairs-per-prompt", type=int, default=None, help="keep at most this many of a prompt's pairs (seeded)")
    sp.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    sp.add_argument("--round", type=int, default=None, help="also queue the pairs in this round")
    overlap_args(sp)
    return p


def cli(name: str, argv: Sequence[str]) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if a.project:
        if a.db:
            parser.error(f"{a.cmd}: give --project or --db, not both")
        from alignment.rounds.project import Project

        try:
            a.db = Project(a.root, a.project).db_url()
        except FileNotFoundError as exc:
            parser.error(f"{a.cmd}: {exc}")
    elif a.db is None:
        a.db = _db_default()
    from data.store import AnnotationError, SchemaError

    try:
        return int(a.fn(a) or 0)
    except (AnnotationError, SchemaError) as exc:
        print(f"align annotate {a.cmd}: error: {exc}", file=sys.stderr)
        return 2
