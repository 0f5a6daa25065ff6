"""What an annotator says about a pair, declared once: :class:`Judgement`.

Its fields are the label's content (TRUE A/B identities). Everything else reads them from here:
the ``labels`` table has one column per field (``data.store.tables.Label``; a test checks it), the
store writes, undoes, changes and audits them through :meth:`Judgement.columns` /
:meth:`Judgement.of`, :class:`data.store.export.LabelRecord` is a Judgement plus its task and
annotator, and the export puts every field the comparison schema has no place for
(:data:`META_FIELDS`) in the comparison's ``meta``. A new field: a field here (with its check in
:meth:`Judgement.validated`), its column and migration in ``data/store/tables.py``, its control in
``ui/app.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from data.errors import DataError
from data.schemas import Strength


class AnnotationError(RuntimeError):
    """A request the store refuses: unknown user or task, a lease that is gone, a bad label."""


@dataclass(frozen=True, kw_only=True)
class Judgement:
    """A label in TRUE identities (what a simulated annotator, the web page or the API submits)."""

    chosen: str  # "A" | "B"
    strength: str | None = None  # a Strength value (or alias); the web page always asks for one
    safe_a: bool | None = None
    safe_b: bool | None = None
    both_bad: bool = False
    comment: str | None = None

    def validated(self) -> Judgement:
        chosen = self.chosen.strip().upper() if isinstance(self.chosen, str) else self.chosen
        if chosen not in ("A", "B"):
            raise AnnotationError(f"chosen must be 'A' or 'B', got {self.chosen!r}")
        try:
            strength = None if self.strength is None else Strength.parse(self.strength).value
        except DataError as exc:
            raise AnnotationError(str(exc)) from None
        for key in ("safe_a", "safe_b"):
            if getattr(self, key) not in (None, True, False):
                raise AnnotationError(f"{key} must be true, false or null, got {getattr(self, key)!r}")
        comment = (self.comment or "").strip() or None
        return Judgement(chosen=chosen, strength=strength, safe_a=self.safe_a, safe_b=self.safe_b, both_bad=bool(self.both_bad),
                         comment=comment)

    def columns(self) -> dict[str, Any]:
        """The label's fields by name: the ``labels`` columns they are stored in, the audit log's record of them."""
        return {name: getattr(self, name) for name in JUDGEMENT_FIELDS}

    @classmethod
    def of(cls, row: Any) -> Judgement:
        """The judgement a stored label (or any object with the fields as attributes) holds."""
        return cls(**{name: getattr(row, name) for name in JUDGEMENT_FIELDS})


JUDGEMENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Judgement))
# fields a data.schemas.Comparison has no field for: exported in its meta (both_bad always, the others when set)
META_FIELDS: tuple[str, ...] = ("both_bad", "comment")
