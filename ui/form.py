"""The label form of the annotation page: one :class:`Control` per control, in ``FORM``.

A control is the whole story of one label field on the page: the component that asks for it, its value on
an empty form, whether it must be answered, how the value shown maps to :class:`data.store.Judgement`'s
keywords (the page shows the two responses in a random order: "A" and "safe_a" are the left side, the
store keeps the true identities) and how a saved label shows again when it is changed. The page
(``ui.app``) lays the controls out, passes them to ``/submit`` in this order and resets, reads and refills
them through this module only, so a new label field is one ``Control`` here (with its ``Judgement``
field, docs/ARCHITECTURE.md's recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from data.schemas import Strength
from data.store import Judgement, LeasedTask

CHOICES = ["A", "B"]
STRENGTHS = [(s.label, s.value) for s in Strength]
SAFETY = [("Safe", "safe"), ("Unsafe", "unsafe")]


@dataclass(frozen=True)
class Control:
    """One control of the label form."""

    key: str  # its name in the form (and the /submit API's parameter)
    blank: Any  # its value on an empty form
    component: Callable[[], Any]  # makes the gradio component (called where the page lays it out)
    to_label: Callable[[Any, LeasedTask], dict[str, Any]]  # the value shown -> Judgement keywords (true identities)
    shown: Callable[[Judgement, LeasedTask], Any]  # a saved label -> the value shown (same left/right order)
    ask: str | None = None  # required: "Please choose <ask>." when it is left empty
    allowed: Collection[Any] | None = None  # the values accepted (None: any)


def _safety(v: bool | None) -> str | None:
    return None if v is None else "safe" if v else "unsafe"


def _true(side: str, task: LeasedTask) -> str:
    """``"a"`` or ``"b"``: the true identity of the response shown on ``side`` ("left"/"right")."""
    return task.true_choice(side).lower()


def _radio(choices: list, label: str, elem_id: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import gradio as gr

        return gr.Radio(choices, label=label, elem_id=elem_id, **kw)
    return make


def _checkbox() -> Any:
    import gradio as gr

    return gr.Checkbox(label="Both responses are bad", elem_id="both-bad")


def _comment() -> Any:
    import gradio as gr

    return gr.Textbox(label="Comment (optional)", lines=1, elem_id="comment")


FORM: tuple[Control, ...] = (
    Control("choice", None, _radio(CHOICES, "Which response is better?", "choice", scale=2, min_width=150),
            lambda v, t: {"chosen": t.true_choice("left" if v == "A" else "right")},
            lambda j, t: "A" if j.chosen == t.true_choice("left") else "B",
            ask="which response is better", allowed=CHOICES),
    Control("strength", None, _radio(STRENGTHS, "How much better?", "strength", scale=5, min_width=300),
            lambda v, t: {"strength": v}, lambda j, t: j.strength,
            ask="how much better", allowed=[v for _, v in STRENGTHS]),
    Control("safe_a", None, _radio(SAFETY, "Response A is", "safe-a"),
            lambda v, t: {f"safe_{_true('left', t)}": v == "safe"}, lambda j, t: _safety(getattr(j, f"safe_{_true('left', t)}")),
            ask="safety of response A", allowed=["safe", "unsafe"]),
    Control("safe_b", None, _radio(SAFETY, "Response B is", "safe-b"),
            lambda v, t: {f"safe_{_true('right', t)}": v == "safe"},
            lambda j, t: _safety(getattr(j, f"safe_{_true('right', t)}")),
            ask="safety of response B", allowed=["safe", "unsafe"]),
    Control("both_bad", False, _checkbox, lambda v, t: {"both_bad": bool(v)}, lambda j, t: bool(j.both_bad)),
    Control("comment", "", _comment, lambda v, t: {"comment": v or None}, lambda j, t: j.comment or ""),
)
KEYS = tuple(c.key for c in FORM)


def blank() -> dict[str, Any]:
    """The values of an empty form."""
    return {c.key: c.blank for c in FORM}


def problems(values: Mapping[str, Any]) -> str | None:
    """Why the form cannot be submitted (what is missing, or a value the page never offers), or None."""
    missing = [c.ask for c in FORM if c.ask and not values.get(c.key)]
    if missing:
        return "Please choose " + ", ".join(missing) + "."
    if any(c.allowed is not None and values.get(c.key) not in c.allowed for c in FORM):
        return "Unknown choice."
    return None


def judgement(values: Mapping[str, Any], task: LeasedTask) -> Judgement:
    """The form's values (as shown) -> the label in true identities."""
    kw: dict[str, Any] = {}
    for c in FORM:
        kw.update(c.to_label(values.get(c.key, c.blank), task))
    return Judgement(**kw)


def shown(label: Judgement, task: LeasedTask) -> dict[str, Any]:
    """A saved label as the form shows it (the task's left/right order)."""
    return {c.key: c.shown(label, task) for c in FORM}
