"""Record types shared by every stage: SFT examples, prompts and human comparisons.

The **comparison** is the contract between the annotation app (which writes it), the reward
models (which train on it), DPO and the evaluations. Its JSON form, one object per line::

    {"id": "cmp-0001",
     "prompt": [{"role": "user", "content": "How do I ...?"}],   # or a plain string
     "response_a": "...", "response_b": "...",
     "source_a": {"model": "sft-r0", "temperature": 0.7},
     "source_b": {"model": "sft-r0", "temperature": 1.0},
     "chosen": "A",                          # which response the annotator preferred
     "strength": "better",                   # Llama 2 scale, see Strength
     "safe_a": true, "safe_b": false,        # safety label per response
     "category": "safety",                   # helpfulness | safety (what the prompt probes)
     "annotator": "alice", "round": 1,
     "created_at": "2026-11-22T10:00:00+00:00", "updated_at": null}

Only ``prompt``, ``response_a``, ``response_b`` and ``chosen`` are required; records from public
datasets have no strength (margin 0) and often no safety labels.

``from_dict`` functions validate and raise :class:`data.errors.DataError` naming the key; the
loaders add the file and line.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from data.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
CATEGORIES = ("helpfulness", "safety")


class Strength(str, enum.Enum):
    """How much better the chosen response is (Llama 2, section 3.2.1), strongest first."""

    SIGNIFICANTLY_BETTER = "significantly_better"
    BETTER = "better"
    SLIGHTLY_BETTER = "slightly_better"
    NEGLIGIBLY_BETTER = "negligibly_better"  # "negligibly better / unsure"

    @property
    def label(self) -> str:
        """Human-readable label as annotators see it."""
        return {
            "significantly_better": "Significantly better",
            "better": "Better",
            "slightly_better": "Slightly better",
            "negligibly_better": "Negligibly better / unsure",
        }[self.value]

    @classmethod
    def parse(cls, value: Any) -> "Strength":
        """Accept the canonical value, the label, or common spellings ("slightly-better", "unsure")."""
        if isinstance(value, Strength):
            return value
        if not isinstance(value, str):
            raise DataError(f"expected a strength word, got {type(value).__name__} {value!r}", key="strength")
        norm = re.sub(r"[\s\-/_]+", "_", value.strip().lower()).strip("_")
        aliases = {
            "significantly_better": cls.SIGNIFICANTLY_BETTER,
            "much_better": cls.SIGNIFICANTLY_BETTER,
            "better": cls.BETTER,
            "slightly_better": cls.SLIGHTLY_BETTER,
            "negligibly_better": cls.NEGLIGIBLY_BETTER,
            "negligibly_better_unsure": cls.NEGLIGIBLY_BETTER,
            "negligibly_better_or_unsure": cls.NEGLIGIBLY_BETTER,
            "unsure": cls.NEGLIGIBLY_BETTER,
        }
        if norm not in aliases:
            valid = ", ".join(s.value for s in cls)
            raise DataError(f"unknown strength {value!r}; expected one of: {valid}", key="strength")
        return aliases[norm]


class SafetyBin(str, enum.Enum):
    """Llama 2's safety bins for a comparison (section 3.2.2), plus the pair it drops."""

    CHOSEN_SAFE_OTHER_UNSAFE = "chosen_safe_other_unsafe"  # 18% in Llama 2
    BOTH_SAFE = "both_safe"  # 47%
    BOTH_UNSAFE = "both_unsafe"  # 35%
    CHOSEN_UNSAFE_OTHER_SAFE = "chosen_unsafe_other_safe"  # dropped from safety RM data


# ---------------------------------------------------------------------------------------------
# validation helpers


def _require(d: dict, key: str) -> Any:
    if key not in d or d[key] is None:
        raise DataError("missing required field", key=key)
    return d[key]


def _text(value: Any, key: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    if not allow_empty and not value.strip():
        raise DataError("empty text", key=key)
    return value


def _opt_bool(d: dict, key: str) -> bool | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("safe", "true", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("unsafe", "false", "no", "0"):
        return False
    raise DataError(f"expected true/false (or 'safe'/'unsafe'), got {value!r}", key=key)


def _opt_int(d: dict, key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"expected an integer, got {value!r}", key=key)
    return value


def _opt_str(d: dict, key: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    return value


def _category(d: dict, key: str = "category") -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if value not in CATEGORIES:
        raise DataError(f"unknown category {value!r}; expected one of: {', '.join(CATEGORIES)}", key=key)
    return value


def parse_messages(value: Any, key: str = "messages") -> list[Message]:
    """Validate a conversation: a non-empty list of ``{role, content}`` with known roles."""
    if not isinstance(value, list) or not value:
        raise DataError("expected a non-empty list of {role, content} messages", key=key)
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"expected an object with role and content, got {type(msg).__name__}", key=where)
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; expected one of: {', '.join(ROLES)}", key=f"{where}.role")
        content = _text(msg.get("content"), f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def prompt_messages(value: Any, key: str = "prompt") -> list[Message]:
    """A prompt given as a string or a conversation; it must end with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, key)}]
    messages = parse_messages(value, key)
    if messages[-1]["role"] != "user":
        raise DataError("a prompt conversation must end with a user turn", key=key)
    return messages


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class SFTExample:
    """A supervised dialogue: the model learns the assistant turns."""

    messages: list[Message]
    id: str | None = None
    category: str | None = None  # free-form: helpful, refusal, borderline, ...
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SFTExample":
        messages = parse_messages(_require(d, "messages"))
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("a dialogue needs at least one assistant turn", key="messages")
        return cls(messages, _opt_str(d, "id"), _opt_str(d, "category"), _opt_str(d, "source"))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PromptRecord:
    """A prompt for sampling (rejection sampling, PPO, annotation rounds, evaluation)."""

    messages: list[Message]  # the conversation so far, ending with a user turn
    category: str = "helpfulness"  # helpfulness | safety (safety prompts use the safety reward)
    id: str | None = None
    source: str | None = None
    tags: list[str] = field(default_factory=list)
    reference: str | None = None  # a good answer to the last user turn (the gold judge compares responses with it)

    @property
    def text(self) -> str:
        """The last user turn."""
        return self.messages[-1]["content"]

    @property
    def is_safety(self) -> bool:
        return self.category == "safety"

    @classmethod
    def from_dict(cls, d: dict) -> "PromptRecord":
        if "messages" in d and d["messages"] is not None:
            messages = prompt_messages(d["messages"], "messages")
        else:
            messages = prompt_messages(_require(d, "prompt"), "prompt")
        tags = d.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError("expected a list of strings", key="tags")
        reference = _opt_str(d, "reference")
        if reference is not None and not reference.strip():
            raise DataError("empty text", key="reference")
        return cls(messages, _category(d) or "helpfulness", _opt_str(d, "id"), _opt_str(d, "source"), tags, reference)

    def to_dict(self) -> dict:
        d = {"id": self.id, "messages": self.messages, "category": self.category, "source": self.source,
             "reference": self.reference}
        if self.tags:
            d["tags"] = self.tags
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class ResponseSource:
    """Which model (and sampling temperature) produced a response."""

    model: str | None = None
    temperature: float | None = None

    @classmethod
    def from_value(cls, value: Any, key: str) -> "ResponseSource | None":
        if value is None:
            return None
        if isinstance(value, str):
            return cls(model=value)
        if not isinstance(value, dict):
            raise DataError("expected {model, temperature} or a model name", key=key)
        temp = value.get("temperature")
        if temp is not None and (isinstance(temp, bool) or not isinstance(temp, (int, float))):
            raise DataError(f"expected a number, got {temp!r}", key=f"{key}.temperature")
        model = value.get("model")
        if model is not None and not isinstance(model, str):
            raise DataError("expected a string", key=f"{key}.model")
        return cls(model=model, temperature=None if temp is None else float(temp))


@dataclass
class Comparison:
    """One human (or simulated) preference judgement between two responses to one prompt."""

    prompt: list[Message]
    response_a: str
    response_b: str
    chosen: Literal["A", "B"]
    strength: Strength | None = None
    safe_a: bool | None = None
    safe_b: bool | None = None
    category: str | None = None
    source_a: ResponseSource | None = None
    source_b: ResponseSource | None = None
    annotator: str | None = None
    round: int | None = None
    id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    meta: dict = field(default_factory=dict)  # anything else (origin dataset, harm category, ...)

    # -- derived views -------------------------------------------------------------------------
    @property
    def chosen_response(self) -> str:
        return self.response_a if self.chosen == "A" else self.response_b

    @property
    def rejected_response(self) -> str:
        return self.response_b if self.chosen == "A" else self.response_a

    @property
    def chosen_safe(self) -> bool | None:
        return self.safe_a if self.chosen == "A" else self.safe_b

    @property
    def rejected_safe(self) -> bool | None:
        return self.safe_b if self.chosen == "A" else self.safe_a

    @property
    def safety_bin(self) -> SafetyBin | None:
        """Llama 2 safety bin, or None when either response lacks a safety label."""
        c, r = self.chosen_safe, self.rejected_safe
        if c is None or r is None:
            return None
        if c and not r:
            return SafetyBin.CHOSEN_SAFE_OTHER_UNSAFE
        if c and r:
            return SafetyBin.BOTH_SAFE
        if not c and not r:
            return SafetyBin.BOTH_UNSAFE
        return SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE

    @property
    def prompt_text(self) -> str:
        return self.prompt[-1]["content"]

    # -- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        if not isinstance(d, dict):
            raise DataError(f"expected a JSON object, got {type(d).__name__}")
        prompt = prompt_messages(_require(d, "prompt"), "prompt")
        a = _text(_require(d, "response_a"), "response_a")
        b = _text(_require(d, "response_b"), "response_b")
        if a.strip() == b.strip():
            raise DataError("response_a and response_b are identical; a comparison needs two different responses",
                            key="response_b")
        chosen = _require(d, "chosen")
        if isinstance(chosen, str) and chosen.strip().upper() in ("A", "B"):
            chosen = chosen.strip().upper()
        else:
            raise DataError(f"expected 'A' or 'B', got {chosen!r}", key="chosen")
        strength = d.get("strength")
        strength = None if strength is None else Strength.parse(strength)
        known = {
            "prompt", "response_a", "response_b", "chosen", "strength", "safe_a", "safe_b", "category",
            "source_a", "source_b", "annotator", "round", "id", "created_at", "updated_at", "meta",
        }
        meta = dict(d.get("meta") or {})
        meta.update({k: v for k, v in d.items() if k not in known})
        return cls(
            prompt=prompt,
            response_a=a,
            response_b=b,
            chosen=chosen,
            strength=strength,
            safe_a=_opt_bool(d, "safe_a"),
            safe_b=_opt_bool(d, "safe_b"),
            category=_category(d),
            source_a=ResponseSource.from_value(d.get("source_a"), "source_a"),
            source_b=ResponseSource.from_value(d.get("source_b"), "source_b"),
            annotator=_opt_str(d, "annotator"),
            round=_opt_int(d, "round"),
            id=_opt_str(d, "id"),
            created_at=_opt_str(d, "created_at"),
            updated_at=_opt_str(d, "updated_at"),
            meta=meta,
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "response_a": self.response_a,
            "response_b": self.response_b,
            "source_a": asdict(self.source_a) if self.source_a else None,
            "source_b": asdict(self.source_b) if self.source_b else None,
            "chosen": self.chosen,
            "strength": self.strength.value if self.strength else None,
            "safe_a": self.safe_a,
            "safe_b": self.safe_b,
            "category": self.category,
            "annotator": self.annotator,
            "round": self.round,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.meta:
            d["meta"] = self.meta
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_preference(
        cls,
        prompt: list[Message] | str,
        chosen: str,
        rejected: str,
        **kwargs: Any,
    ) -> "Comparison":
        """Build from a chosen/rejected pair (public preference data): A is the chosen one."""
        return cls.from_dict({"prompt": prompt, "response_a": chosen, "response_b": rejected, "chosen": "A", **kwargs})


@dataclass
class TruthfulnessItem:
    """A TruthfulQA-style multiple-choice item; the first answer of ``mc1_targets`` is gold."""

    question: str
    mc1_targets: dict[str, int]
    mc2_targets: dict[str, int]
    category: str | None = None
    id: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TruthfulnessItem":
        question = _text(_require(d, "question"), "question")
        targets = {}
        for key in ("mc1_targets", "mc2_targets"):
            value = _require(d, key)
            if not isinstance(value, dict) or len(value) < 2:
                raise DataError("expected an object of at least two {answer: 0/1}", key=key)
            for answer, label in value.items():
                if label not in (0, 1) or isinstance(label, bool):
                    raise DataError(f"label of {answer!r} must be 0 or 1, got {label!r}", key=key)
            if sum(value.values()) < 1:
                raise DataError("needs at least one true answer (1)", key=key)
            targets[key] = dict(value)
        mc1 = targets["mc1_targets"]
        if sum(mc1.values()) != 1 or next(iter(mc1.values())) != 1:
            raise DataError("mc1_targets needs exactly one true answer, listed first", key="mc1_targets")
        return cls(question, mc1, targets["mc2_targets"], _opt_str(d, "category"), _opt_str(d, "id"))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}
