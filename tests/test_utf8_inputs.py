"""Files that are not UTF-8 fail with the file, the line and the column, never a UnicodeDecodeError."""

import gzip

import pytest

from alignment.config import ConfigError, load_config
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
