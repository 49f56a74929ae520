"""`clusterlm prepare` as a user runs it: the embedded corpus, and one-line errors for bad input."""

from __future__ import annotations

import functools

import pytest

from clusterlm import cli
from clusterlm.data import prepare as prepare_module
from clusterlm.data.manifest import load_manifest, token_dtype, verify_shards


def run(*args: str) -> int:
    return cli.main(["prepare", *map(str, args)])


def test_embedded_corpus_with_char_tokenizer(tmp_path, capsys):
    out = tmp_path / "shakespeare"
    assert run("--out", out, "--workers", 2) == 0
    manifest = verify_shards(out)
    assert len(manifest.sources) == 42 and manifest.tokenizer.kind == "char"
    assert manifest.dtype == "uint16" and manifest.vocab_size < 256
    total = manifest.splits["train"].tokens + manifest.splits["val"].tokens
    assert 4_500_000 < total < 5_100_000
    assert manifest.splits["val"].tokens == pytest.approx(0.1 * total, rel=0.01)
    assert "prepared" in capsys.readouterr().out
    assert run("--out", out) == 0
    assert "up to date" in capsys.readouterr().out


def test_positional_and_option_inputs_and_globs(tmp_path, corpus_dir):
    out = tmp_path / "out"
    assert (
        run(corpus_dir / "a.txt", "--input", f"{corpus_dir}/**/c.txt", "--out", out, "--workers", 1)
        == 0
    )
    assert [s.name for s in load_manifest(out).sources] == [
        str(corpus_dir / "a.txt"),
        str(corpus_dir / "sub/c.txt"),
    ]


def test_bpe_tokenizer_and_reusing_its_tokenizer_json(tmp_path, corpus_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        run(corpus_dir, "--out", first, "--tokenizer", "bpe", "--vocab-size", 300, "--workers", 1)
        == 0
    )
    assert (
        run(corpus_dir, "--out", second, "--tokenizer", first / "tokenizer.json", "--workers", 1)
        == 0
    )
    a, b = load_manifest(first), load_manifest(second)
    assert (a.tokenizer.kind, b.tokenizer.kind) == ("bpe", "file")
    assert a.tokenizer.sha256 == b.tokenizer.sha256 and a.splits == b.splits


def test_refuses_another_dataset_without_force(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    assert run(corpus_dir, "--out", out, "--workers", 1) == 0
    assert run(corpus_dir, "--out", out, "--workers", 1, "--seed", 7) == 2
    assert "--force" in capsys.readouterr().err
    assert run(corpus_dir, "--out", out, "--workers", 1, "--seed", 7, "--force") == 0
    assert load_manifest(out).seed == 7


def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (inputs and options, text the error line must contain)."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    return {
        "empty input": ([tmp_path / "empty.txt", tmp_path / "blank.txt"], "hold no text"),
        "not utf-8": ([tmp_path / "latin1.txt"], "latin1.txt is not UTF-8"),
        "missing path": ([tmp_path / "missing.txt"], "missing.txt does not exist"),
        "glob matching nothing": ([f"{tmp_path}/*.md"], "matches no files"),
        "unknown tokenizer": (["--tokenizer", "chr"], "tokenizer chr does not exist"),
        "vocab size without bpe": (["--vocab-size", "300"], "only to --tokenizer bpe"),
        "bad val fraction": (["--val-fraction", "1.5"], "--val-fraction 1.5 is out of range"),
        "usage mistake": (["--shard-tokens", "many"], "invalid int value"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty input",
        "not utf-8",
        "missing path",
        "glob matching nothing",
        "unknown tokenizer",
        "vocab size without bpe",
        "bad val fraction",
        "usage mistake",
    ],
)
@pytest.mark.parametrize("out_state", ["absent", "prepared"])
def test_bad_input_is_one_error_line_and_leaves_out_as_it_was(
    case, out_state, tmp_path, corpus_dir, capsys, tree
):
    out = tmp_path / "out"
    if out_state == "prepared":
        assert run(corpus_dir, "--out", out, "--workers", 1) == 0
    before = tree(out)
    argv, expected = bad_inputs(tmp_path)[case]
    capsys.readouterr()
    assert run(*argv, "--out", out, "--workers", 1, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert tree(out) == before


def test_vocabulary_too_large_for_the_token_dtype(tmp_path, corpus_dir, monkeypatch, capsys):
    monkeypatch.setattr(
        prepare_module, "token_dtype", functools.partial(token_dtype, candidates=("uint8",))
    )
    out = tmp_path / "out"
    assert (
        run(corpus_dir, "--out", out, "--tokenizer", "bpe", "--vocab-size", 300, "--workers", 1)
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit in uint8" in err
    assert not out.exists()
