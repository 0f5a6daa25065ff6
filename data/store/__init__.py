"""The annotation store: people (and simulated annotators) compare two responses; the reward models
train on what it exports. SQLAlchemy over SQLite (WAL, the default) or PostgreSQL (by URL). It
knows nothing of the web app: ``ui/`` only calls this API, and so do the CLI and the round
orchestrator.

    from data.store import AnnotationStore, Judgement

    store = AnnotationStore("sqlite:///runs/annotations.db")       # or "postgresql://user@host/db"
    store.add_user("alice", role="annotator", password="...")      # humans: salted scrypt hash only
    store.queue_file(1, "pairs.jsonl", overlap=0.1, overlap_labels=3)   # round 1; 10% of tasks get 3 labels
    store.queue(1, [{"prompt": "...", "response_a": "...", "response_b": "..."}])   # or records

    task = store.next_task("alice", round=1)       # LeasedTask: a lease (token) on one task, or None
    task.left, task.right                          # what a page shows (order randomised per assignment)
    store.submit(task.token, "alice", Judgement(chosen=task.true_choice("left"), strength="better",
                 safe_a=True, safe_b=False))       # committed before it returns; retries are no-ops
    store.skip(task.token, "alice", "unfamiliar topic")     # back to the queue for others
    store.undo_last("alice")                       # deletes the last label, leases its task again

    # a round orchestrator: queue, let a simulated annotator label, wait for people, export
    store.missing_labels(round=1)                  # labels still needed in the round
    store.label_with(ScorerAnnotator("sim:rm-helpful", reward_model), round=1)   # data.store.simulated
    store.label_with(FunctionAnnotator("sim:rules", lambda task: Judgement(chosen="A", strength="better")), round=1)
    result = store.export(1, policy="majority")    # runs/annotations/exports/round-1/comparisons-v1.jsonl
    store.stats(round=1)                           # progress, per annotator, strengths, safety bins, agreement

Rules the store guarantees (tested on SQLite and PostgreSQL):

- a task needs ``labels_needed`` labels (``queue(..., labels=1, overlap=0.1, overlap_labels=3)``);
  an annotator never labels the same task twice; a live lease counts as a label in flight, so
  concurrent annotators never receive the same single-label task; a lease expires after
  ``lease_seconds`` (default 30 min) and its task returns to the queue, as does a skipped task
  (for everyone but the annotator who skipped it);
- labels are stored in TRUE identities (A/B as queued), with the shown order (``swapped``) kept
  for position-bias statistics; a simulated annotator works in true identities directly;
- ``submit`` returns after the commit: an acknowledged label survives a killed server;
- exports are the comparison format (``data.schemas.Comparison``) that
  ``data.loaders.load_comparisons`` and the reward stage read; each is a new numbered version
  per round and never overwrites a file;
- the schema is versioned (``schema_version`` table, :mod:`data.store.tables`); a newer database
  is refused rather than altered.
"""

from data.store.export import LabelRecord, plan_export
from data.store.pairs import TaskSpec, read_tasks
from data.store.simulated import FunctionAnnotator, ScorerAnnotator
from data.store.label import AnnotationError, Judgement
from data.store.store import AnnotationStore
from data.store.values import (
    DEFAULT_DB,
    DEFAULT_EXPORT_DIR,
    ExportResult,
    LeasedTask,
    LeaseLost,
    Progress,
    RecentLabel,
    SimulatedAnnotator,
    SubmitResult,
    TaskWait,
    UserInfo,
)
from data.store.tables import SCHEMA_VERSION, SchemaError

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_EXPORT_DIR",
    "SCHEMA_VERSION",
    "AnnotationError",
    "AnnotationStore",
    "ExportResult",
    "FunctionAnnotator",
    "Judgement",
    "LabelRecord",
    "LeaseLost",
    "LeasedTask",
    "Progress",
    "RecentLabel",
    "SchemaError",
    "ScorerAnnotator",
    "SimulatedAnnotator",
    "SubmitResult",
    "TaskSpec",
    "TaskWait",
    "UserInfo",
    "plan_export",
    "read_tasks",
]
