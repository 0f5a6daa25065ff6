"""Converters from the dataset formats met in the wild to our records.

Each converter takes one row (a dict) and returns records or raises :class:`DataError` naming the
key; the loaders add file and line. Formats (the layouts of the public datasets each is named after):

==================  ============================================================  ==================
format              row                                                           gives
==================  ============================================================  ==================
comparison          our record (``data.schemas.Comparison``)                      comparisons
hh-rlhf             ``{chosen, rejected}`` full ``\\n\\nHuman: … \\n\\nAssistant: …``  comparisons, prompts, SFT
                    transcripts; the shared prefix is the prompt
pku-saferlhf        ``prompt, response_0, response_1, better_response_id,          comparisons, prompts
                    safer_response_id, is_response_{0,1}_safe``
trl-preference      ``prompt, chosen, rejected`` (strings or message lists),       comparisons, prompts
                    optional ``margin``
messages            ``{messages: [{role, content}, …]}``                           SFT, prompts
alpaca              ``instruction, input, output``                                  SFT, prompts
prompt-completion   ``prompt, completion`` (strings or message lists)               SFT, prompts
prompt              ``prompt`` or ``messages`` ending with a user turn, ``category``  prompts
truthfulqa-mc       ``question, mc1_targets, mc2_targets``                          truthfulness items
self-instruct       ``instruction, instances: [{input, output}]``                   SFT (one per instance)
task                any row, rendered by an instruction-template family            SFT
                    (``template:`` in the source, see ``data.templates``)
==================  ============================================================  ==================
"""

from __future__ import annotations

import re
from typing import Any, Callable

from data.errors import DataError
from data.schemas import Comparison, Message, PromptRecord, SFTExample, Strength, TruthfulnessItem, parse_messages

FORMATS = (
    "comparison", "hh-rlhf", "pku-saferlhf", "trl-preference", "messages", "alpaca", "prompt-completion",
    "prompt", "truthfulqa-mc", "self-instruct", "task",
)


def detect_format(row: dict) -> str:
    """Guess a row's format from its keys."""
    keys = set(row)
    if {"response_a", "response_b", "chosen"} <= keys:
        return "comparison"
    if {"response_0", "response_1"} <= keys and ("better_response_id" in keys or "safer_response_id" in keys):
        return "pku-saferlhf"
    if {"chosen", "rejected"} <= keys:
        return "trl-preference" if "prompt" in keys else "hh-rlhf"
    if {"question", "mc1_targets"} <= keys:
        return "truthfulqa-mc"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "instruction" in keys and "instances" in keys:
        return "self-instruct"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "messages" in keys:
        msgs = row["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") in ("user", "system"):
            return "prompt"  # a conversation waiting for the assistant
        return "messages"  # a dialogue (malformed ones fail in its validation, naming the key)
    if "prompt" in keys:
        return "prompt"
    raise DataError(f"cannot tell the format of a row with keys {sorted(keys)}; set format: explicitly")


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF transcripts

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_transcript(text: str, key: str = "transcript") -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user: a}, {assistant: b}]`` (empty last turn kept)."""
    if not isinstance(text, str):
        raise DataError(f"expected a transcript string, got {type(text).__name__}", key=key)
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError("expected a transcript starting with '\\n\\nHuman: '", key=key)
    out: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        out.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return out


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split an HH-RLHF pair into (prompt conversation, chosen response, rejected response).

    The prompt is the longest shared prefix of both transcripts that ends with the last
    ``\\n\\nAssistant:`` marker inside it; the two responses are what follows.
    """
    marker = "\n\nAssistant:"
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(marker, 0, common + len(marker))
    if cut < 0 or cut + len(marker) > common + len(marker):
        raise DataError("the two transcripts share no '\\n\\nAssistant:' turn", key="chosen")
    prompt = parse_transcript(chosen[:cut], "chosen")
    if prompt[-1]["role"] != "user":
        raise DataError("the shared prefix does not end with a Human turn", key="chosen")
    return prompt, chosen[cut + len(marker):].strip(), rejected[cut + len(marker):].strip()


def hh_to_comparison(row: dict) -> Comparison:
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise DataError("missing transcript", key=key)
    prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
    return Comparison.from_preference(prompt, chosen, rejected, meta={"origin": "hh-rlhf"})


# ---------------------------------------------------------------------------------------------
# PKU-SafeRLHF


def _pku_bool(row: dict, key: str) -> bool:
    value = row.get(key)
    if not isinstance(value, bool):
        raise DataError(f"expected true/false, got {value!r}", key=key)
    return value


def pku_to_comparison(row: dict, preference: str = "better") -> Comparison:
    """PKU-SafeRLHF row -> comparison by ``better_response_id`` (or ``safer_response_id``)."""
    key = f"{preference}_response_id"
    winner = row.get(key)
    if winner not in (0, 1):
        raise DataError(f"expected 0 or 1, got {winner!r}", key=key)
    meta = {"origin": "pku-saferlhf"}
    for extra in ("response_0_harm_category", "response_1_harm_category", "response_0_severity_level",
                  "response_1_severity_level"):
        if extra in row:
            meta[extra] = row[extra]
    return Comparison.from_dict({
        "prompt": row.get("prompt"),
        "response_a": row.get("response_0"),
        "response_b": row.get("response_1"),
        "chosen": "A" if winner == 0 else "B",
        "safe_a": _pku_bool(row, "is_response_0_safe"),
        "safe_b": _pku_bool(row, "is_response_1_safe"),
        "category": "safety",
        "meta": meta,
    })


# ---------------------------------------------------------------------------------------------
# TRL preference / prompt-completion


def _turns(value: Any, key: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else []
    return parse_messages(value, key)


def _response_text(value: Any, key: str) -> str:
    """A TRL completion: a string, or a message list whose assistant turns are the response."""
    if isinstance(value, str):
        return value
    msgs = parse_messages(value, key)
    texts = [m["content"] for m in msgs if m["role"] == "assistant"]
    if not texts:
        raise DataError("no assistant turn in the completion", key=key)
    return "\n".join(texts)


_MARGIN_TO_STRENGTH: list[tuple[float, Strength]] = [
    (1.0, Strength.SIGNIFICANTLY_BETTER), (2 / 3, Strength.BETTER), (1 / 3, Strength.SLIGHTLY_BETTER),
]


def trl_to_comparison(row: dict) -> Comparison:
    prompt = row.get("prompt")
    if prompt is None:
        raise DataError("missing required field", key="prompt")
    prompt_msgs = _turns(prompt, "prompt")
    if not prompt_msgs:
        raise DataError("empty text", key="prompt")
    meta: dict[str, Any] = {"origin": "trl-preference"}
    if "margin" in row and row["margin"] is not None:
        if isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float)):
            raise DataError(f"expected a number, got {row['margin']!r}", key="margin")
        meta["margin"] = float(row["margin"])
    return Comparison.from_preference(
        prompt_msgs, _response_text(row.get("chosen"), "chosen"), _response_text(row.get("rejected"), "rejected"), meta=meta
    )


def alpaca_to_sft(row: dict) -> SFTExample:
    """Alpaca ``instruction, input, output``; the input, if any, follows the instruction."""
    instruction = row.get("instruction")
    output = row.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError("missing or empty", key="instruction")
    if not isinstance(output, str) or not output.strip():
        raise DataError("missing or empty", key="output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError("expected a string", key="input")
    user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
    return SFTExample([{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}],
                      id=row.get("id"), source="alpaca")


def prompt_completion_to_sft(row: dict) -> SFTExample:
    prompt = _turns(row.get("prompt"), "prompt")
    completion = row.get("completion")
    if isinstance(completion, str):
        if not completion.strip():
            raise DataError("empty text", key="completion")
        messages = prompt + [{"role": "assistant", "content": completion}]
    else:
        messages = prompt + parse_messages(completion, "completion")
    return SFTExample.from_dict({"messages": messages, "id": row.get("id")})


# ---------------------------------------------------------------------------------------------
# dispatch by what the caller wants


def to_comparison(row: dict, fmt: str) -> Comparison:
    conv: dict[str, Callable[[dict], Comparison]] = {
        "comparison": Comparison.from_dict,
        "hh-rlhf": hh_to_comparison,
        "pku-saferlhf": pku_to_comparison,
        "trl-preference": trl_to_comparison,
    }
    if fmt not in conv:
        raise DataError(f"format {fmt!r} has no preference pairs; use one of: {', '.join(conv)}")
    return conv[fmt](row)


def to_sft(row: dict, fmt: str, template: str | None = None, seed: int = 0) -> SFTExample | list[SFTExample]:
    """One dialogue (or several, for self-instruct tasks); ``template`` re-phrases task rows."""
    from data import templates

    if fmt == "messages":
        return SFTExample.from_dict(row)
    if fmt == "alpaca":
        return templates.render(row, template, seed=seed) if template else alpaca_to_sft(row)
    if fmt == "self-instruct":
        return templates.expand_self_instruct(row, seed=seed)
    if fmt == "task":
        if not template:
            raise DataError("format 'task' needs a template family (template: qa, summarization, ...)", key="template")
        return templates.render(row, template, seed=seed)
    if fmt == "prompt-completion":
        return prompt_completion_to_sft(row)
    if fmt in ("hh-rlhf", "trl-preference", "comparison", "pku-saferlhf"):
        cmp = to_comparison(row, fmt)  # supervised on the preferred response
        return SFTExample(cmp.prompt + [{"role": "assistant", "content": cmp.chosen_response}], id=cmp.id, source=fmt)
    raise DataError(f"format {fmt!r} has no dialogues to train on")


def to_prompt(row: dict, fmt: str) -> PromptRecord:
    """The prompt side of a row; ``reference`` = the answer the row gives (the preferred response of a
    pair, the assistant turn after the last user turn of a dialogue, the output of an instruction)."""
    if fmt == "prompt":
        return PromptRecord.from_dict(row)
    if fmt in ("comparison", "hh-rlhf", "pku-saferlhf", "trl-preference"):
        cmp = to_comparison(row, fmt)
        category = cmp.category or row.get("category") or ("safety" if fmt == "pku-saferlhf" else "helpfulness")
        return PromptRecord(cmp.prompt, category=category, id=cmp.id, source=fmt, reference=cmp.chosen_response or None)
    if fmt == "messages":
        ex = SFTExample.from_dict(row)
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        after = ex.messages[last_user + 1:]
        reference = after[0]["content"] if after and after[0]["role"] == "assistant" else None
        category = {"helpful": "helpfulness", "refusal": "safety",
                    "borderline": "safety"}.get(row.get("category"), row.get("category"))
        tags = ["borderline"] if row.get("category") == "borderline" else []
        return PromptRecord(ex.messages[: last_user + 1],
                            category=category if category in ("helpfulness", "safety") else "helpfulness",
                            id=ex.id, source=fmt, tags=tags, reference=reference)
    if fmt in ("alpaca", "prompt-completion"):
        ex = to_sft(row, fmt)
        assert isinstance(ex, SFTExample)
        return PromptRecord(ex.messages[:-1], id=ex.id, source=fmt, reference=ex.messages[-1]["content"])
    if fmt == "self-instruct":  # one prompt per task: its first instance, instruction then input (Alpaca style)
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError("expected a non-empty list of {input, output}", key="instances")
        try:
            ex = alpaca_to_sft({"instruction": row.get("instruction"), **instances[0]})
        except DataError as exc:
            raise DataError(exc.message, key=f"instances[0].{exc.key}" if exc.key != "instruction" else "instruction") from None
        return PromptRecord(ex.messages[:-1], id=str(row["id"]) if row.get("id") is not None else None, source=fmt,
                            reference=ex.messages[-1]["content"])
    raise DataError(f"format {fmt!r} has no prompts")


def to_truthfulness(row: dict, fmt: str) -> TruthfulnessItem:
    if fmt != "truthfulqa-mc":
        raise DataError(f"format {fmt!r} has no multiple-choice items")
    return TruthfulnessItem.from_dict(row)
