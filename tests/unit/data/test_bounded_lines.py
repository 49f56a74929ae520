"""Inputs are read a line at a time: a line over ``--max-line-bytes`` is refused with one line
(its number, the file and the fix) as soon as that many bytes of it are read, in a corpus text
file and in a JSONL task alike; decoding line by line finds the bad byte the whole file would."""

from __future__ import annotations

import io
import json

import pytest

from clusterlm import cli
from clusterlm.data import lines as lines_module
from clusterlm.data.documents import decoded_lines
from clusterlm.data.lines import bounded_lines
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.task_prepare import TaskOptions, prepare_task
from clusterlm.errors import UserError


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize(
    "data", [b"", b"a", b"a\n", b"\n\n", b"ab\ncd\n\nefg", b"12345\n1234\n123456"]
)
def test_lines_are_the_file_cut_after_each_line_break(monkeypatch, block, data):
    monkeypatch.setattr(lines_module, "_BLOCK", block)
    limit = 6
    expected = data.split(b"\n")
    expected = [line + b"\n" for line in expected[:-1]] + ([expected[-1]] if expected[-1] else [])
    assert list(bounded_lines(io.BytesIO(data), "f", limit)) == expected
    assert b"".join(bounded_lines(io.BytesIO(data), "f", limit)) == data


@pytest.mark.parametrize("block", [2, 5, 1 << 20])
@pytest.mark.parametrize(
    "data, number", [(b"1234567\n", 1), (b"ok\n1234567", 2), (b"ok\n\n" + b"x" * 100, 3)]
)
def test_a_long_line_is_refused_with_its_number(monkeypatch, block, data, number):
    monkeypatch.setattr(lines_module, "_BLOCK", block)
    with pytest.raises(UserError) as caught:
        list(bounded_lines(io.BytesIO(data), "corpus.txt", 6))
    assert str(caught.value) == (
        f"line {number} of corpus.txt is over --max-line-bytes (6 bytes); "
        "split it or raise the limit"
    )


def test_a_long_line_is_refused_before_it_is_read_whole(monkeypatch):
    monkeypatch.setattr(lines_module, "_BLOCK", 1024)
    stream = CountingStream(b"x" * (1 << 20))
    with pytest.raises(UserError, match="line 1 of"):
        list(bounded_lines(stream, "big", 4096))
    assert stream.bytes_read <= 4096 + 1024


@pytest.mark.parametrize(
    "data",
    [
        b"caf\xc3\xa9\nna\xefve\n",
        b"ok\n\xe2\x82\nmore",
        b"ok\nend\xe2\x82",
        b"\xef\xbb\xbfbom\r\n\x80",
    ],
)
def test_a_bad_byte_is_reported_at_the_offset_the_whole_file_gives(data):
    with pytest.raises(UnicodeDecodeError) as whole:
        data.decode("utf-8")
    with pytest.raises(UserError) as caught:
        list(decoded_lines(bounded_lines(io.BytesIO(data), "f.txt", 100), "f.txt"))
    assert f"bad byte at offset {whole.value.start})" in str(caught.value)


def test_decoding_drops_a_byte_order_mark_and_windows_line_ends():
    data = "\ufeffone\r\ntwo\r\r\nthree\r".encode()
    assert list(decoded_lines(bounded_lines(io.BytesIO(data), "f", 100), "f")) == [
        "one\n",
        "two\r\n",
        "three\r",
    ]


def test_prepare_refuses_a_long_line_and_writes_nothing(tmp_path, corpus_dir):
    (corpus_dir / "long.txt").write_text("short\n" + "y" * 300 + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        prepare(
            PrepareOptions(inputs=(str(corpus_dir),), out=str(out), workers=1, max_line_bytes=200)
        )
    assert str(caught.value).startswith(
        f"line 2 of {corpus_dir / 'long.txt'} is over --max-line-bytes (200 bytes)"
    )
    assert not out.exists()
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(out), workers=1, max_line_bytes=300))


def test_a_jsonl_task_refuses_a_long_line(tmp_path):
    rows = [
        {"text": f"example {i}", "label": i % 2, "split": ("train", "val", "test")[i % 3]}
        for i in range(12)
    ]
    rows[7]["text"] = "z" * 500
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        UserError, match=rf"^line 8 of {path} is over --max-line-bytes \(256 bytes\)"
    ):
        prepare_task(
            TaskOptions(task=f"jsonl:{path}", out=str(tmp_path / "out"), max_line_bytes=256)
        )
    assert not (tmp_path / "out").exists()
    prepare_task(TaskOptions(task=f"jsonl:{path}", out=str(tmp_path / "out"), max_line_bytes=1024))


def test_the_limit_is_a_command_line_option(tmp_path, corpus_dir, capsys):
    args = ["prepare", str(corpus_dir), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert cli.main([*args, "--max-line-bytes", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: line 1 of ")
        and "--max-line-bytes (10 bytes)" in err
        and "\n" not in err
    )
    assert cli.main([*args, "--max-line-bytes", "0"]) == 2
    assert "--max-line-bytes 0 must be positive" in capsys.readouterr().err
    assert cli.main(args) == 0
