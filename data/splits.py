"""The three prompt sets of a project, and the rule that keeps the test set out of every decision.

A project holds its prompts in three disjoint sets (``alignment.rounds.Project``):

- the **pool** (``prompt_pool.jsonl``): what sampling for annotation, rejection sampling, PPO and
  GRPO rollouts read;
- **validation** (``validation.jsonl``, every row tagged ``split:validation``): what decisions read:
  PPO's keep-best and early stopping, promotion's win rate against the previous policy, anything
  tuned;
- **test** (``heldout.jsonl``, every row tagged ``split:test``): what only the reported numbers read.

Code that decides runs inside :func:`selecting`; while it does, loading a prompt tagged
``split:test`` raises :class:`TestSetRead` naming the decision and the file (``data.loaders``
checks every prompt it loads). Reporting code reads the test set outside any ``selecting`` block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

TEST_TAG = "split:test"
VALIDATION_TAG = "split:validation"

_DECISION: contextvars.ContextVar[str | None] = contextvars.ContextVar("align_decision", default=None)


class TestSetRead(RuntimeError):
    """A decision (selection, promotion, tuning) tried to read test prompts."""

    __test__ = False  # not a pytest test class


@contextlib.contextmanager
def selecting(decision: str) -> Iterator[None]:
    """Mark the code inside as deciding something (``decision`` names it in the error)."""
    token = _DECISION.set(decision)
    try:
        yield
    finally:
        _DECISION.reset(token)


def current_decision() -> str | None:
    return _DECISION.get()


def check_not_test(tags_of_records: Iterator[list[str]] | list[list[str]], where: str) -> None:
    """Raise :class:`TestSetRead` when a decision is running and any record is tagged as a test prompt."""
    decision = _DECISION.get()
    if decision is None:
        return
    if any(TEST_TAG in (tags or []) for tags in tags_of_records):
        raise TestSetRead(f"{decision} read test prompts ({where}): decisions read the validation set only; the test set is "
                          "for the reported numbers")
