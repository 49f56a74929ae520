"""The bad-input corpus, data part: mixes of datasets (``data.mix``) and the cleaning and
deduplication options of `clusterlm prepare`."""

from __future__ import annotations

from pathlib import Path

import fsspec
from bad_inputs_harness import TINY, case, write

from clusterlm.data.prepare import PrepareOptions, prepare

TRAIN = ("train", "--training.out_dir", "{tmp}/out", *TINY)


def other_tokenizer(tmp, shared) -> None:
    """A dataset prepared from other text, so with another char tokenizer."""
    (tmp / "other.txt").write_text("a different alphabet: xyz XYZ 0123456789\n" * 200)
    prepare(PrepareOptions(inputs=(str(tmp / "other.txt"),), out=str(tmp / "other")))


def mix(id: str, value: str, expect: str, **options) -> object:
    return case(f"mix-{id}", *TRAIN, "--data.mix", value, expect=expect, **options)


def mix_toml(id: str, value: str, expect: str) -> object:
    text = f"[data]\nmix = {value}\n"
    return case(
        f"mix-toml-{id}",
        *TRAIN,
        "--config",
        "{tmp}/mix.toml",
        setup=write("mix.toml", text),
        expect=expect,
    )


MIXES = [
    mix("zero-weight", "{data}=0.5,{tmp}/b=0", "must be a positive number"),
    mix("negative-weight", "{data}=1,{tmp}/b=-0.5", "must be a positive number"),
    mix("nan-weight", "{data}=nan", "must be a positive number"),
    mix("weight-not-a-number", "{data}=half", "is not a number"),
    mix("no-weight", "{data}", "has no DIR=WEIGHT"),
    mix("empty-entry", "{data}=1,", "has no DIR=WEIGHT"),
    mix("same-dir-twice", "{data}=1,{data}=2", "twice"),
    mix("missing-dir", "{data}=1,{tmp}/missing=1", "no prepared data"),
    mix("is-a-task", "{data}=1,{task}=1", "labelled task"),
    mix("other-tokenizer", "{data}=1,{tmp}/other=1", "another tokenizer", setup=other_tokenizer),
    case(  # refused by the launcher's checks, before any worker starts
        "mix-other-tokenizer-launched",
        *TRAIN,
        "--nproc",
        "2",
        "--data.mix",
        "{data}=1,{tmp}/other=1",
        setup=other_tokenizer,
        expect="another tokenizer",
    ),
    mix_toml("empty", "[]", "empty list"),
    mix_toml("zero-weight", '[{dir = "{data}", weight = 0}]', "must be a positive number"),
    mix_toml("no-weight", '[{dir = "{data}"}]', "must be a table with dir and weight"),
    mix_toml("not-tables", '["{data}"]', "must be a table with dir and weight"),
]


def clean(id: str, *options: str, expect: str) -> object:
    text = "now is the winter of our discontent\n" * 20
    return case(
        f"prepare-clean-{id}",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        *options,
        setup=write("a.txt", text),
        expect=expect,
    )


CLEANING = [
    clean("dedup-unknown", "--dedup", "fuzzy", expect="--dedup"),
    clean("min-chars-negative", "--min-chars", "-1", expect="must be >= 0"),
    clean("max-below-min", "--min-chars", "50", "--max-chars", "10", expect="below --min-chars"),
    clean("non-letter-above-one", "--max-non-letter", "1.5", expect="--max-non-letter"),
    clean("near-threshold-one", "--near-threshold", "1", expect="--near-threshold"),
    clean("near-threshold-nan", "--near-threshold", "nan", expect="--near-threshold"),
    clean("removes-everything", "--min-chars", "100000", expect="removed every document"),
    clean("nproc-zero", "--nproc", "0", expect="--nproc"),
    case(
        "prepare-clean-with-task",
        "prepare",
        "--task",
        "play-classification",
        "--out",
        "{tmp}/out",
        "--dedup",
        "exact",
        expect="no cleaning options",
    ),
]


def on_the_store(name: str, change_shard: bool = False):
    """Setup: the shared dataset copied onto a remote store (memory://bad-inputs/NAME), its first
    train shard overwritten there with other bytes of the same size when ``change_shard``."""

    def setup(tmp, shared) -> None:
        store = fsspec.filesystem("memory")
        for path in Path(shared.data).iterdir():
            store.pipe_file(f"/bad-inputs/{name}/{path.name}", path.read_bytes())
        if change_shard:
            shard = f"/bad-inputs/{name}/train_00000.bin"
            store.pipe_file(shard, bytes(len(store.cat_file(shard))))
        (tmp / "file").write_text("not a directory")

    return setup


STORE = [
    case("store-cache-gb-zero", *TRAIN, "--data.cache_gb", "0", expect="data.cache_gb"),
    case("store-retry-negative", *TRAIN, "--data.retry_s", "-1", expect="data.retry_s"),
    case(
        "store-shard-changed",
        *TRAIN,
        "--data.dir=memory://bad-inputs/changed",
        "--data.cache_dir={tmp}/cache",
        setup=on_the_store("changed", change_shard=True),
        expect="changed on the store",
        may_change=("cache", "out", "out/metrics.jsonl"),  # the run began; no checkpoint
    ),
    case(
        "store-cache-dir-not-writable",
        *TRAIN,
        "--data.dir=memory://bad-inputs/unwritable",
        "--data.cache_dir={tmp}/file/cache",
        setup=on_the_store("unwritable"),
        expect="is not a writable directory",
    ),
]

# S3 as a user reaches it: the standard AWS variables, no AWS files, one attempt per request.
S3_NOWHERE = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
    "AWS_ACCESS_KEY_ID": "clusterlm",
    "AWS_SECRET_ACCESS_KEY": "clusterlm-secret",
    "AWS_CONFIG_FILE": "{tmp}/no-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "{tmp}/no-aws-credentials",
    "AWS_MAX_ATTEMPTS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3_NO_CREDENTIALS = {**S3_NOWHERE, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
PREPARE_S3 = ("prepare", "{tmp}/text.txt", "--out", "s3://corpus/data")
TEXT = write("text.txt", "the store is where the data is\n" * 20)


def s3_case(id: str, env: dict[str, str], expect: str) -> list[object]:
    """``prepare --out s3://`` and training from ``data.dir = s3://``, on one and two processes;
    each a process of its own, as the S3 client's settings are read once per process."""
    train = (*TRAIN, "--data.dir", "s3://corpus/data", "--data.cache_dir", "{tmp}/cache")
    options = dict(env=env, expect=expect, subprocess=True)
    return [
        case(f"s3-{id}-prepare", *PREPARE_S3, setup=TEXT, **options),
        case(f"s3-{id}-train", *train, **options),
        case(f"s3-{id}-train-nproc2", *train, "--nproc", "2", **options),
    ]


S3 = [
    *s3_case("unreachable", S3_NOWHERE, "does not answer (EndpointConnectionError"),
    *s3_case("no-credentials", S3_NO_CREDENTIALS, "no credentials found"),
]

DATA_CASES = [*MIXES, *CLEANING, *STORE, *S3]
