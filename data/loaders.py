"""Load records from local files, the bundled datasets, or the Hugging Face Hub.

A *source* is a string:

- ``bundled:<name>``: a dataset shipped in ``data/bundled`` (``sft``, ``comparisons``, ``prompts``,
  ``truthfulness``);
- a local file: ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``), ``.csv``,
  ``.parquet``, optionally gzipped (``.jsonl.gz``, ``.json.gz``, ``.csv.gz``);
- a local folder holding a Hugging Face dataset: a copy of its Hub repository (``<subset>/<split>-*.parquet``,
  ``<subset>/<split>.jsonl.gz``, ``data/<split>-*.parquet``) or a ``datasets.save_to_disk`` folder; ``split``
  and ``subset`` pick the files, as they pick the configuration on the Hub;
- ``hub:<owner>/<name>`` (or a bare ``owner/name`` that is not a local path): loaded with
  ``datasets.load_dataset``; needs the Hub, which these machines cannot reach.

Every row is converted with :mod:`data.formats`; a bad row raises :class:`DataError` naming the
file and line (record number for JSON/Parquet). Everything is read and validated before a
caller writes anything.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

from foundation.config import check, option
from data import formats
from data.errors import DataError
from data.schemas import Comparison, PromptRecord, SFTExample, TruthfulnessItem

log = logging.getLogger(__name__)
T = TypeVar("T")

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED = ("sft", "comparisons", "prompts", "truthfulness")
LENIENT_FORMATS = ("hh-rlhf",)


@dataclass
class DataSource:
    """One dataset in a mixture."""

    path: str = option("bundled:sft",
                       "bundled:<name>, a local .jsonl/.json/.csv/.parquet file (optionally .gz), or hub:<owner>/<name>")
    format: Literal["auto", "comparison", "hh-rlhf", "pku-saferlhf", "trl-preference", "messages", "alpaca", "prompt-completion",
                    "prompt", "truthfulqa-mc", "self-instruct", "task"] = option(
        "auto", "row format; auto detects it from the keys of the first row")
    weight: float = option(1.0, "mixture weight: 1 = every record once, 0.5 = a seeded random half, 2 = every record twice")
    split: str = option("train", "split to read from a Hub dataset or a local dataset folder")
    subset: str | None = option(None, "dataset configuration name (or data_dir), on the Hub or in a local dataset folder")
    limit: int | None = option(None, "read at most this many records (after conversion), null = all")
    category: Literal["helpfulness", "safety"] | None = option(None, "set this category on every record that has none (e.g. "
                                                                     "safety for a harmless-base file)")
    template: str | None = option(None, "instruction-template family applied to SFT records from task data (see "
                                        "data.templates), null = none")
    turns: Literal["all", "first"] = option("all", "prompts: the dialogue up to the answer (all) or only its first user turn "
                                                   "(first: multi-turn dialogues such as HH-RLHF's become single questions; "
                                                   "the reference answer is dropped unless the dialogue had one turn)")

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "path", "must not be empty")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0 or null, got {self.limit}")


# ---------------------------------------------------------------------------------------------
# raw rows


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def decode_utf8(raw: bytes, path: str | Path, first_line: int = 1) -> str:
    """``raw`` as text (UTF-8, a leading BOM dropped), or a DataError naming the line and column of
    the first byte that is not UTF-8 (instead of a UnicodeDecodeError traceback)."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + first_line
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {column}; save the file as UTF-8",
                        path=path, line=line) from None


def read_text_file(path: str | Path) -> str:
    """A whole user text file (``.gz`` too) as UTF-8, with a DataError naming file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    with _open_binary(path) as fh:
        return decode_utf8(fh.read(), path)


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext in (".json", ".csv", ".parquet"):
        return ext[1:]
    raise DataError(f"unsupported file type {''.join(path.suffixes)!r}; expected .jsonl, .json, .csv or .parquet", path=path)


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line or record number, row dict) from a local file. Malformed rows raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    kind = _kind(path)
    if kind == "jsonl":
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = decode_utf8(raw, path, first_line=lineno)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=path, line=lineno) from None
                except RecursionError:
                    raise DataError("JSON nested too deeply to read", path=path, line=lineno) from None
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}", path=path, line=lineno)
                yield lineno, row
    elif kind == "json":
        text = read_text_file(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg}", path=path, line=exc.lineno) from None
        except RecursionError:
            raise DataError("JSON nested too deeply to read", path=path) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError("expected a JSON list of objects (or {\"data\": [...]})", path=path)
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DataError(f"record {i}: expected an object, got {type(row).__name__}", path=path)
            yield i, row
    elif kind == "csv":
        with io.StringIO(read_text_file(path), newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                return
            for row in reader:
                if None in row:
                    raise DataError(f"more columns than the header's {len(reader.fieldnames)}", path=path, line=reader.line_num)
                if any(v is None for v in row.values()):
                    raise DataError(f"fewer columns than the header's {len(reader.fieldnames)}", path=path, line=reader.line_num)
                yield reader.line_num, dict(row)
    else:  # parquet
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row


def _hub_rows(name: str, split: str, subset: str | None) -> Iterator[tuple[int, dict]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading from the Hub needs the `datasets` package") from exc
    try:
        ds = (datasets.load_dataset(name, subset, split=split) if subset and "/" not in subset
              else datasets.load_dataset(name, data_dir=subset, split=split))
    except Exception as exc:  # offline: ConnectionError, FileNotFoundError, DatasetNotFoundError ...
        raise DataError(f"could not load Hub dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}",
                        path=f"hub:{name}") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".ndjson")


def local_dataset_files(folder: Path, split: str, subset: str | None = None) -> list[Path]:
    """The data files of ``split`` in a local copy of a Hugging Face dataset repository.

    Layouts met in the wild: ``<subset>/<split>-00000-of-00001.parquet`` (a Hub repository with
    configurations, e.g. ``truthful_qa/multiple_choice/validation-...parquet``), ``<subset>/<split>.jsonl.gz``
    (data_dir layouts such as ``Anthropic/hh-rlhf/helpful-base/test.jsonl.gz``), ``data/<split>-*.parquet``
    (the Hub's parquet conversion), ``<split>/*.parquet`` and plain ``<split>.jsonl`` beside each other.
    """
    bases = [folder / subset] if subset else []
    bases += [folder, folder / "data"]
    for base in bases:
        if not base.is_dir():
            continue
        hits = sorted(f for f in base.iterdir() if f.is_file() and f.name.endswith(DATA_SUFFIXES)
                      and (f.name.split(".")[0] == split or f.name.startswith((f"{split}-", f"{split}_"))))
        if not hits and (base / split).is_dir():
            hits = sorted(f for f in (base / split).iterdir() if f.is_file() and f.name.endswith(DATA_SUFFIXES))
        if hits:
            return hits
    return []


def _local_dataset_rows(folder: Path, split: str, subset: str | None) -> tuple[str, Iterator[tuple[int, dict]]]:
    """Rows of a local dataset folder: ``datasets.save_to_disk`` output or a copy of a Hub repository."""
    disk = folder / subset if subset and (folder / subset).is_dir() else folder
    if (disk / "dataset_dict.json").is_file() or (disk / "state.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(disk))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"no split {split!r} (splits: {', '.join(ds)})", path=disk)
            ds = ds[split]

        def rows() -> Iterator[tuple[int, dict]]:
            for i, row in enumerate(ds, 1):
                yield i, dict(row)
        return f"{disk} ({split})", rows()
    files = local_dataset_files(folder, split, subset)
    if not files:
        where = f"{folder}/{subset}" if subset else str(folder)
        raise DataError(f"no data files for split {split!r} in this folder (expected e.g. {split}-00000-of-00001.parquet, "
                        f"{split}.jsonl.gz, data/{split}-*.parquet or a datasets.save_to_disk folder)", path=where)

    def chained() -> Iterator[tuple[int, dict]]:
        for f in files:  # each file's rows are numbered from 1, and errors name the file
            yield from read_rows(f)
    return str(files[0]) if len(files) == 1 else f"{files[0].parent}/{split}-*", chained()


def source_rows(source: str, split: str = "train", subset: str | None = None) -> tuple[str, Iterator[tuple[int, dict]]]:
    """(display name, rows) of a source string. A local folder is read as a Hugging Face dataset
    (``split`` and ``subset`` pick the files, see :func:`local_dataset_files`)."""
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        path = BUNDLED_DIR / f"{name}.jsonl"
        if name not in BUNDLED or not path.is_file():
            raise DataError(f"unknown bundled dataset {name!r}; available: {', '.join(BUNDLED)}", path=source)
        return str(path), read_rows(path)
    if source.startswith("hub:"):
        name = source[4:]
        return source, _hub_rows(name, split, subset)
    p = Path(source).expanduser()
    if p.is_dir():
        return _local_dataset_rows(p, split, subset)
    if p.exists() or p.suffix or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return str(p), read_rows(p)
    return f"hub:{source}", _hub_rows(source, split, subset)


# ---------------------------------------------------------------------------------------------
# typed loading


def _load(
    src: DataSource | str,
    convert: Callable[[dict, str], T],
    *,
    on_invalid: Literal["error", "skip"] = "error",
) -> list[T]:
    if isinstance(src, str):
        src = DataSource(path=src)
    where, rows = source_rows(src.path, src.split, src.subset)
    out: list[T] = []
    skipped: list[str] = []
    fixed_format = None if src.format == "auto" else src.format
    for lineno, row in rows:
        fmt = fixed_format
        try:
            if fmt is None:  # detected once, from the first row: later rows must match it
                fmt = fixed_format = formats.detect_format(row)
            converted = convert(row, fmt)
        except DataError as exc:
            # HH-RLHF's published files hold a few degenerate pairs (identical transcripts, an
            # empty response or turn: 10 of the 4,666 test rows); they carry no preference, so they
            # are skipped and counted. Our own formats fail on the first bad row.
            if on_invalid == "skip" or fmt in LENIENT_FORMATS:
                skipped.append(f"{lineno} ({exc.key}: {exc.message})")
                continue
            raise exc.located(where, lineno) from None
        for rec in converted if isinstance(converted, list) else [converted]:
            if src.category and not row.get("category") and hasattr(rec, "category"):
                rec.category = src.category  # the file's rows say nothing: the source config decides
            out.append(rec)
        if src.limit and len(out) >= src.limit:
            out = out[: src.limit]
            break
    if skipped:
        log.warning("%s: skipped %d invalid rows (lines %s%s)", where, len(skipped), "; ".join(skipped[:3]),
                    " ..." if len(skipped) > 3 else "")
    if not out:
        raise DataError("no records", path=where)
    return out


def load_comparisons(src: DataSource | str, **kw: Any) -> list[Comparison]:
    """Preference pairs from our comparisons, HH-RLHF, PKU-SafeRLHF or TRL preference files."""
    return _load(src, formats.to_comparison, **kw)


def load_sft(src: DataSource | str, **kw: Any) -> list[SFTExample]:
    """Dialogues from messages, Alpaca, prompt-completion or preference data (the chosen side)."""
    template = src.template if isinstance(src, DataSource) else None
    return _load(src, lambda row, fmt: formats.to_sft(row, fmt, template=template), **kw)


def load_prompts(src: DataSource | str, **kw: Any) -> list[PromptRecord]:
    """Prompts from prompt files or the prompt side of any dialogue or preference data
    (``turns: first``: only the first user turn of each, with its system turn; duplicates dropped)."""
    from data.splits import check_not_test

    records = _load(src, formats.to_prompt, **kw)
    check_not_test([r.tags for r in records], src.path if isinstance(src, DataSource) else str(src))
    if not isinstance(src, DataSource) or src.turns == "all":
        return records
    out, seen = [], set()
    for r in records:
        first = next(i for i, m in enumerate(r.messages) if m["role"] == "user")
        if first < len(r.messages) - 1:  # a later turn existed: the reference answered that one
            r.messages, r.reference = r.messages[: first + 1], None
        key = json.dumps(r.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def load_truthfulness(src: DataSource | str, **kw: Any) -> list[TruthfulnessItem]:
    """TruthfulQA multiple-choice items (``mc_task.json`` layout or our bundled file)."""
    return _load(src, formats.to_truthfulness, **kw)


# ---------------------------------------------------------------------------------------------
# writing


def write_jsonl(path: str | Path, rows: list[dict] | Iterator[dict], *, overwrite: bool = False) -> Path:
    """Write rows atomically (temp file, then rename). Refuses to replace a file unless told to."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
