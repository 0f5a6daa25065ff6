"""Load test of the annotation app: simulated annotators submitting through ``gradio_client``.

    flock /tmp/align-heavy.lock .venv/bin/python -m benchmarks.annotation_load --annotators 50 --duration 60

Results go to benchmarks/results/annotation_load.json (or ``--out``) with the machine's description.

Phases, each on a fresh SQLite database served by ``align annotate serve``:

- ``steady``: N annotators (threads spread over a few client processes, each logged in with its
  own account) load a task, submit a label, and go on at once, for ``--duration`` seconds: the
  server's saturated throughput;
- ``kill``: the same, but the server is killed with SIGKILL half-way and restarted on the same
  database and port; clients log in again and carry on (an in-flight submit is not acknowledged);
- ``paced``: like ``steady`` with ``--think-s`` seconds between submissions (a person reads two
  answers before clicking): latency when the server is not saturated;
- ``store``: the same calls the page makes (task_for, submit, next_task, progress) made directly on
  the store from N threads, without Gradio or HTTP: what the database layer alone sustains.

After each served phase the database is checked: every acknowledged submission (the page said
"Saved label #id") is stored exactly once, for the right user and lease; no task has more labels
than it needs; and no single-label task was ever leased to two annotators (from the ``events``
audit log). Reported: acknowledged submissions per second, the p50/p95 latency of a submit (which
includes fetching the next task), and the server's CPU seconds per submission. The server, the
clients and the database share the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PASSWORD = "load-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(db: str, port: int, log: Path, synchronous: str, concurrency: int) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "annotate", "serve", "--db", db, "--port", str(port),
                                 "--sqlite-synchronous", synchronous, "--concurrency", str(concurrency)],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


# ---------------------------------------------------------------------------------------------
# clients


def annotator(url: str, name: str, ready: Any, go: Any, stop: Any, out: list, errors: list, think: float) -> None:
    """One simulated annotator: log in, wait for the start, label until told to stop; log in
    again after a server death (a restarted server has forgotten every session)."""
    from gradio_client import Client

    rng = random.Random(name)
    client, token, first = None, "", True
    while not stop.is_set():
        try:
            if client is None:
                client = Client(url, auth=(name, PASSWORD), verbose=False, analytics_enabled=False, download_files=False,
                                httpx_kwargs={"timeout": 60})
                token = client.predict(api_name="/load")[3]
                if first:
                    ready.release()
                    go.wait()
                    first = False
            if not token:
                return  # nothing left for this annotator
            if think:
                stop.wait(rng.uniform(0.5 * think, 1.5 * think))
                if stop.is_set():
                    break
            args = (rng.choice("AB"), rng.choice(["significantly_better", "better", "slightly_better", "negligibly_better"]),
                    rng.choice(["safe", "unsafe"]), rng.choice(["safe", "unsafe"]), False, "")
            t0 = time.perf_counter()
            res = client.predict(token, *args, api_name="/submit")
            dt = time.perf_counter() - t0
            status = res[12]
            if not status.startswith("Saved label #"):
                raise RuntimeError(f"unexpected status {status!r}")
            out.append({"user": name, "token": token, "label_id": int(status.removeprefix("Saved label #").rstrip(".")),
                        "latency": dt, "at": time.time()})
            token = res[3]
        except Exception as exc:  # noqa: BLE001 - a killed server shows up as many error types
            errors.append({"user": name, "at": time.time(), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            client = None
            time.sleep(0.5)
    if first:
        ready.release()


def client_process(url: str, names: list[str], ready: Any, go: Any, stop: Any, result_path: str, think: float) -> None:
    out: list = []
    errors: list = []
    threads = [threading.Thread(target=annotator, args=(url, n, ready, go, stop, out, errors, think), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(result_path).write_text(json.dumps({"acks": out, "errors": errors}))


# ---------------------------------------------------------------------------------------------
# checks


def verify(db: str, acks: list[dict]) -> dict:
    from sqlalchemy import text

    from data.store import AnnotationStore

    store = AnnotationStore(db)
    with store.engine.connect() as c:
        labels = {row.id: row for row in c.execute(text(
            "select l.id, u.name, a.token, l.task_id from labels l join users u on u.id = l.user_id "
            "join assignments a on a.id = l.assignment_id"))}
        per_assignment = c.execute(text("select count(*) from (select assignment_id from labels group by assignment_id "
                                        "having count(*) > 1) x")).scalar()
        over_full = c.execute(text("select count(*) from tasks t where (select count(*) from labels l where l.task_id = t.id) "
                                   "> t.labels_needed or t.labels_done > t.labels_needed")).scalar()
        lease_users = c.execute(text("select t.id, count(distinct e.user_id) from events e join tasks t on t.id = e.task_id "
                                     "where e.action = 'lease' and t.labels_needed = 1 group by t.id")).all()
        lease_users_overlap = c.execute(text(
            "select t.id, count(distinct e.user_id), t.labels_needed from events e join tasks t on t.id = e.task_id "
            "where e.action = 'lease' and t.labels_needed > 1 group by t.id, t.labels_needed")).all()
    store.close()
    missing = [a for a in acks if a["label_id"] not in labels]
    wrong = [a for a in acks if a["label_id"] in labels and (labels[a["label_id"]].name != a["user"]
                                                            or labels[a["label_id"]].token != a["token"])]
    ack_ids = [a["label_id"] for a in acks]
    return {
        "acknowledged": len(acks),
        "labels_in_db": len(labels),
        "acknowledged_missing": len(missing),
        "acknowledged_wrong_user_or_lease": len(wrong),
        "acknowledged_twice": len(ack_ids) - len(set(ack_ids)),
        "stored_but_not_acknowledged": len(set(labels) - set(ack_ids)),
        "assignments_with_two_labels": per_assignment,
        "tasks_over_their_label_count": over_full,
        "single_label_tasks_leased_to_two_annotators": sum(1 for _, n in lease_users if n > 1),
        "overlap_tasks_leased_to_more_annotators_than_needed": sum(1 for _, n, need in lease_users_overlap if n > need),
        "ok": not missing and not wrong and len(ack_ids) == len(set(ack_ids)) and per_assignment == 0 and over_full == 0
              and all(n <= 1 for _, n in lease_users) and all(n <= need for _, n, need in lease_users_overlap),
    }


def summarize(acks: list[dict], start: float, end: float) -> dict:
    lat = sorted(a["latency"] for a in acks)

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    return {"submissions": len(acks), "seconds": round(end - start, 1), "submissions_per_s": round(len(acks) / (end - start), 2),
            "latency_ms_p50": q(0.50), "latency_ms_p95": q(0.95), "latency_ms_max": round(lat[-1] * 1000, 1) if lat else None,
            "latency_ms_mean": round(statistics.mean(lat) * 1000, 1) if lat else None}


# ---------------------------------------------------------------------------------------------


def phase(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from data.store import AnnotationStore

    db = f"sqlite:///{workdir}/{name}.db"
    store = AnnotationStore(db)
    names = [f"annotator{i:02d}" for i in range(args.annotators)]
    for n in names:
        store.add_user(n, password=PASSWORD)
    store.queue(1, [{"id": f"t{i}", "prompt": f"Question number {i}: how should I do this?",
                     "response_a": f"Answer A to {i}. " * 20,
                     "response_b": f"Answer B to {i}. " * 15} for i in range(args.tasks)],
                overlap=args.overlap, overlap_labels=3)
    store.close()
    port = free_port()
    log = workdir / f"{name}-server.log"
    server = start_server(db, port, log, args.sqlite_synchronous, args.concurrency)
    url = f"http://127.0.0.1:{port}/"
    ready, go, stop = mp.Semaphore(0), mp.Event(), mp.Event()
    groups = [names[i::args.client_processes] for i in range(args.client_processes)]
    results = [str(workdir / f"{name}-clients-{i}.json") for i in range(len(groups))]
    think = args.think_s if name == "paced" else 0.0
    procs = [mp.Process(target=client_process, args=(url, g, ready, go, stop, r, think)) for g, r in zip(groups, results)]
    for p in procs:
        p.start()
    t_login = time.time()
    for _ in names:  # everyone logged in and holding a task
        if not ready.acquire(timeout=600):
            raise RuntimeError("annotators did not log in")
    login_s = time.time() - t_login
    start = time.time()
    go.set()
    cpu0, server_cpu = cpu_seconds(server.pid), 0.0
    kills = []
    if name == "kill":
        time.sleep(args.duration / 2)
        server_cpu += cpu_seconds(server.pid) - cpu0
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed_at = time.time()
        server = start_server(db, port, log, args.sqlite_synchronous, args.concurrency)
        kills.append({"killed_at_s": round(killed_at - start, 1), "back_after_s": round(time.time() - killed_at, 1)})
        cpu0 = cpu_seconds(server.pid)
        time.sleep(args.duration / 2)
    else:
        time.sleep(args.duration)
    stop.set()
    end = time.time()
    server_cpu += cpu_seconds(server.pid) - cpu0
    for p in procs:
        p.join(timeout=180)
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    acks, errors = [], []
    for r in results:
        d = json.loads(Path(r).read_text())
        acks += d["acks"]
        errors += d["errors"]
    timed = [a for a in acks if a["at"] <= end]  # a submit finishing after the stop is checked, not timed
    report = {"phase": name, "think_s": think, "login_all_s": round(login_s, 1), **summarize(timed, start, end),
              "server_cpu_s": round(server_cpu, 1),
              "server_cpu_ms_per_submission": round(1000 * server_cpu / max(1, len(timed)), 1), "client_errors": len(errors),
              "error_examples": sorted({e["error"] for e in errors})[:5], "kills": kills, "check": verify(db, acks)}
    if kills:
        # throughput while the server was up, and the latency outside the outage
        k = kills[0]["killed_at_s"] + start
        before = [a for a in timed if a["at"] < k]
        after = [a for a in timed if a["at"] >= k + kills[0]["back_after_s"]]
        report["before_kill"] = summarize(before, start, k)
        report["after_restart"] = summarize(after, k + kills[0]["back_after_s"], end) if after else None
    return report


def store_phase(args: argparse.Namespace, workdir: Path) -> dict:
    """The page's store calls from N threads in this process, no HTTP: the database layer's ceiling."""
    from data.store import AnnotationStore, Judgement

    db = f"sqlite:///{workdir}/store.db"
    store = AnnotationStore(db, sqlite_synchronous=args.sqlite_synchronous)
    names = [f"annotator{i:02d}" for i in range(args.annotators)]
    for n in names:
        store.add_user(n, kind="simulated")
    store.queue(1, [{"id": f"t{i}", "prompt": f"Question number {i}: how should I do this?",
                     "response_a": f"Answer A to {i}. " * 20,
                     "response_b": f"Answer B to {i}. " * 15} for i in range(args.tasks)], overlap=args.overlap, overlap_labels=3)
    acks: list[dict] = []
    stop = threading.Event()
    barrier = threading.Barrier(len(names) + 1)

    def work(name: str) -> None:
        rng = random.Random(name)
        task = store.next_task(name)
        barrier.wait()
        while task is not None and not stop.is_set():
            t0 = time.perf_counter()
            t = store.task_for(task.token, name)
            res = store.submit(t.token, name, Judgement(chosen=t.true_choice(rng.choice(["left", "right"])), strength="better",
                                                        safe_a=True, safe_b=True))
            task = store.next_task(name)
            store.progress(name, max_age=2.0)
            acks.append({"user": name, "token": t.token, "label_id": res.label_id, "latency": time.perf_counter() - t0,
                         "at": time.time()})

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.time()
    cpu0 = time.process_time()
    time.sleep(args.duration / 2)
    stop.set()
    end = time.time()
    cpu = time.process_time() - cpu0
    for t in threads:
        t.join()
    store.close()
    timed = [a for a in acks if a["at"] <= end]
    return {"phase": "store", **summarize(timed, start, end),
            "process_cpu_ms_per_submission": round(1000 * cpu / max(1, len(timed)), 1), "check": verify(db, acks)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--overlap", type=float, default=0.1)
    p.add_argument("--client-processes", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16, help="server: requests handled at once")
    p.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--phases", default="steady,kill,paced,store", help="comma-separated: steady, kill, paced, store")
    p.add_argument("--think-s", type=float, default=10.0, help="paced phase: mean seconds between an annotator's submissions")
    p.add_argument("--out", help="write the report (JSON) here instead of benchmarks/results/annotation_load.json")
    args = p.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from benchmarks.common import machine, save

    host = machine()  # before the run: its load average is the other jobs'
    reports = []
    with tempfile.TemporaryDirectory(prefix="align-load-") as tmp:
        for name in args.phases.split(","):
            rep = store_phase(args, Path(tmp)) if name == "store" else phase(name, args, Path(tmp))
            print(json.dumps(rep, indent=2), flush=True)
            reports.append(rep)
    meta = {"annotators": args.annotators, "duration_s": args.duration, "tasks": args.tasks,
            "sqlite_synchronous": args.sqlite_synchronous,
            "concurrency": args.concurrency, "machine": host, "note": "server, clients and database share the machine"}
    report = {"config": meta, "phases": reports}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(save("annotation_load", report))
    return 0 if all(r["check"]["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
