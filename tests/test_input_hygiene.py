"""Bad input files fail with the file, the line and the key: bytes that are not UTF-8, task rows with NUL
characters, NaN or oversized responses, user names that only look alike (issue 14)."""

import gzip

import pytest

from foundation.config import ConfigError, load_config
from data.errors import DataError
from data.loaders import read_rows, read_text_file
from tests.conftest import run_align

BAD = '{"prompt":"Q\xff","response_a":"a","response_b":"b"}\n'.encode("latin-1")
GOOD = b'{"prompt":"Q","response_a":"a","response_b":"b"}\n'


@pytest.mark.parametrize("name,data,where", [
    ("x.jsonl", GOOD + BAD, ":2: not UTF-8: byte 0xff at column 13"),
    ("x.jsonl.gz", gzip.compress(GOOD + GOOD + BAD), ":3: not UTF-8: byte 0xff"),
    ("x.csv", b"prompt,response_a,response_b\nQ,a,b\nQ\xe9,a,b\n", ":3: not UTF-8: byte 0xe9 at column 2"),
    ("x.json", b'[\n{"prompt": "Q"},\n{"prompt": "\xfe"}\n]\n', ":3: not UTF-8: byte 0xfe at column 13"),
])
def test_reader_names_file_line_and_column(tmp_path, name, data, where):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        list(read_rows(path))
    assert str(err.value).startswith(f"{path}{where}")


def test_utf8_with_bom_and_multibyte_text_still_reads(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9 \u2014 \u6f22\u5b57"}\n'.encode())
    assert [row for _, row in read_rows(path)] == [{"prompt": "caf\u00e9 \u2014 \u6f22\u5b57"}]
    assert read_text_file(path).startswith('{"prompt"')


def test_text_file_reader(tmp_path):
    path = tmp_path / "hate_asian_1k.txt"
    path.write_bytes(b"- one\n- two \x80\n")
    with pytest.raises(DataError, match=r"hate_asian_1k.txt:2: not UTF-8: byte 0x80 at column 7"):
        read_text_file(path)


def test_config_file_that_is_not_utf8(tmp_path):
    from alignment.sft import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_bytes(b"stage: sft\nrun:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"sft.yaml:3.*not UTF-8: byte 0xe9"):
        load_config(SFTConfig, path)


def test_annotate_queue_with_a_non_utf8_task_file(tmp_path):
    """The issue's reproduction: an error naming file and line, exit code 2, nothing queued."""
    pairs = tmp_path / "x.jsonl"
    pairs.write_bytes(BAD)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    res = run_align("annotate", "queue", "--db", db, "--round", "1", "--pairs", str(pairs))
    assert res.returncode == 2, res.stderr
    assert f"{pairs}:1: not UTF-8: byte 0xff at column 13" in res.stderr
    assert "Traceback" not in res.stderr


# -- what else a task file must not smuggle into the store (issue 14) -----------------------------

def _queue(tmp_path, rows_text: str, *extra: str, db_name: str = "a.db"):
    pairs = tmp_path / "t.jsonl"
    pairs.write_text(rows_text, encoding="utf-8")
    db = f"sqlite:///{tmp_path / db_name}"
    return pairs, db, run_align("annotate", "queue", "--db", db, "--round", "1", "--pairs", str(pairs), *extra)


def test_queue_refuses_long_responses_nul_and_nan_naming_file_line_and_key(tmp_path):
    from data.store import AnnotationStore

    ok = '{"prompt": "Q1", "response_a": "a", "response_b": "b"}\n'
    long_b = '{"prompt": "Q2", "response_a": "a", "response_b": "%s"}\n' % ("x" * (32 * 1024 + 1))
    pairs, db, res = _queue(tmp_path, ok + long_b)
    assert res.returncode == 2 and f"{pairs}:2: response_b: 32769 bytes, over the limit of 32768" in res.stderr, res.stderr
    assert AnnotationStore(db).rounds() == []  # all or nothing: line 1 was not queued either
    pairs, db, res = _queue(tmp_path, ok + long_b, "--max-response-kb", "64", db_name="b.db")
    assert res.returncode == 0 and "queued 2 tasks" in res.stdout, res.stderr
    for row, where in [('{"prompt": "Q\\u0000", "response_a": "a", "response_b": "b"}',
                        "prompt: contains a NUL character (at position 1)"),
                       ('{"prompt": "Q", "response_a": "a\\u0000", "response_b": "b"}', "response_a: contains a NUL character"),
                       ('{"prompt": "Q", "response_a": "a", "response_b": "b", "source_a": {"model": "m", "temperature": NaN}}',
                        "source_a.temperature: not a finite number: nan"),
                       ('{"prompt": "Q", "response_a": "a", "response_b": "b", "meta": {"score": Infinity}}',
                        "meta.score: not a finite number: inf")]:
        pairs, db, res = _queue(tmp_path, ok + row + "\n", db_name="c.db")
        assert res.returncode == 2 and f"{pairs}:2: {where}" in res.stderr, (row, res.stderr)


def test_queue_refuses_lone_surrogates_and_deep_nesting_naming_file_and_line(tmp_path):
    """Both crashed `align annotate queue` with a traceback (UnicodeEncodeError, RecursionError)."""
    from data.store import AnnotationStore
    from data.store.pairs import MAX_DEPTH, read_tasks

    ok = '{"prompt": "Q1", "response_a": "a", "response_b": "b"}\n'
    pairs, db, res = _queue(tmp_path, ok + '{"prompt": "Q", "response_a": "A\\ud800", "response_b": "B"}\n')
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{pairs}:2: response_a: contains a lone surrogate '\\ud800' (at position 1)" in res.stderr, res.stderr
    assert AnnotationStore(db).rounds() == []
    deep = '{"prompt": "Q", "response_a": "A", "response_b": "B", "meta": %s1%s}\n'
    f = tmp_path / "deep.jsonl"
    f.write_text(ok + deep % ('{"x": ' * 100_000, "}" * 100_000))
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested too deeply to read"):
        read_tasks(f)
    f.write_text(ok + deep % ('{"x": ' * (MAX_DEPTH + 1), "}" * (MAX_DEPTH + 1)))
    with pytest.raises(DataError, match=rf"deep.jsonl:2: meta(\.x)+: nested more than {MAX_DEPTH} levels deep"):
        read_tasks(f)
    f.write_text(ok + deep % ('{"x": ' * (MAX_DEPTH - 1), "}" * (MAX_DEPTH - 1)))
    assert len(read_tasks(f)) == 2  # nesting within the limit is kept


def test_user_names_with_a_trailing_newline_or_space_are_refused(tmp_path):
    from data.store import AnnotationError, AnnotationStore

    store = AnnotationStore(f"sqlite:///{tmp_path / 'a.db'}")
    store.add_user("ann1", password="pw-ann1-pw")
    for bad in ("ann1\n", "ann1 ", " ann1", "ann1\t", "ann\n1"):
        with pytest.raises(AnnotationError, match="invalid user name"):
            store.add_user(bad, password="pw-ann1-pw")
    assert [u.name for u in store.users()] == ["ann1"]


SEPARATORS = "line\u2028sep\u2029para\x85nel\x0cff\x1cfs\x0bvt\rcr"  # all of these end a line for str.splitlines()


def test_jsonl_rows_holding_unicode_line_separators_read_back_whole(tmp_path):
    """json.dumps(..., ensure_ascii=False) leaves U+2028, U+0085, form feeds ... inside strings; a model can generate
    them, and rlhf_core's samples, PPO's samples and RS's pool are written that way. Every reader of those files must
    split at "\\n" only (str.splitlines() cut a row in two: rlhf_core stopped with a JSONDecodeError)."""
    import json

    from alignment.ppo.loop import _drop_samples_after
    from alignment.rs import _count_by_round
    from data.loaders import write_jsonl
    from foundation.runs import read_jsonl

    rows = [{"iteration": i, "round": 1 + i % 2, "text": f"{i} {SEPARATORS}"} for i in range(4)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert any(c in path.read_text(encoding="utf-8") for c in "\u2028\x85")  # written raw, not escaped
    assert read_jsonl(path) == rows
    assert _count_by_round(path) == {"1": 2, "2": 2}
    _drop_samples_after(path, 1)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line] == rows[:2]
