"""The bad-input corpus, part one: configs, corpora, prepared data, tasks, launch environments,
signals and disks. Part two (``bad_inputs_table_runs.py``) holds checkpoints, Hugging Face
directories and the other commands; ``CASES`` is both.

Each entry: ``case(id, *argv, setup=..., expect=..., env=..., subprocess=..., may_change=...)``
(``bad_inputs_harness.Case``). ``{tmp}`` is the entry's own directory and the working directory of
the command; ``{data}``, ``{run}``, ``{ckpt}``, ``{task}`` and ``{hf}`` are good shared inputs,
which no entry may change (copy one with ``copy_of`` to break it).
"""

from __future__ import annotations

from bad_inputs_harness import (
    TINY,
    both,
    case,
    copy_of,
    flip_byte,
    jsonl,
    remove,
    replace,
    truncate,
    write,
)
from bad_inputs_table_data import DATA_CASES
from bad_inputs_table_hardening import HARDENING
from bad_inputs_table_long_context import LONG_CONTEXT
from bad_inputs_table_runs import RUN_CASES
from bad_inputs_table_translation import TRANSLATION

DEEP = "[" * 100_000  # a JSON document nested deeper than any parser's recursion
TRAIN = ("train", "--data.dir", "{data}", "--training.out_dir", "{tmp}/out", *TINY)
TOML = "{tmp}/bad.toml"
RANKS = {
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29511",
}


def toml(id: str, text: str | bytes, expect: str = "") -> object:
    return case(id, *TRAIN, "--config", TOML, setup=write("bad.toml", text), expect=expect)


CONFIGS = [
    toml("config-toml-syntax", "[training\nsteps = 3\n", "invalid TOML"),
    toml("config-toml-invalid-utf8", b'[training]\nout_dir = "\xff\xfe"\n', "UTF-8"),
    toml("config-toml-binary-junk", bytes(range(256)) * 8, "bad.toml"),
    toml("config-toml-key-outside-section", "steps = 3\n", "must be a [section] table"),
    toml("config-toml-unknown-key", "[training]\nstepz = 3\n", "did you mean 'training.steps'"),
    toml("config-toml-unknown-section", "[trainin]\nsteps = 3\n", "unknown config key"),
    toml(
        "config-toml-wrong-type",
        '[training]\nsteps = "many"\n',
        "training.steps must be an integer",
    ),
    toml(
        "config-toml-array-value",
        "[training]\nsteps = [1, 2]\n",
        "training.steps must be an integer",
    ),
    toml(
        "config-toml-table-value",
        "[training]\nout_dir = { a = 1 }\n",
        "training.out_dir must be a string",
    ),
    toml(
        "config-toml-date-value",
        "[training]\nsteps = 1979-05-27\n",
        "training.steps must be an integer",
    ),
    toml("config-toml-steps-inf", "[training]\nsteps = inf\n", "training.steps"),
    toml("config-toml-lr-string", '[optim]\nlr = "fast"\n', "optim.lr must be a number"),
    case("config-file-missing", *TRAIN, "--config", "{tmp}/missing.toml", expect="not found"),
    case("config-file-is-directory", *TRAIN, "--config", "{tmp}", expect="not found"),
    case(
        "config-unknown-key",
        *TRAIN,
        "--training.stepz",
        "3",
        expect="did you mean 'training.steps'",
    ),
    case(
        "config-wrong-type",
        *TRAIN,
        "--training.steps",
        "many",
        expect="training.steps must be an integer",
    ),
    case(
        "config-fraction-for-integer",
        *TRAIN,
        "--training.steps",
        "2.5",
        expect="must be an integer",
    ),
    case("config-steps-1e999", *TRAIN, "--training.steps", "1e999", expect="training.steps"),
    case("config-steps-nan", *TRAIN, "--training.steps", "nan", expect="training.steps"),
    case("config-bool", *TRAIN, "--metrics.jsonl", "maybe", expect="true or false"),
    case("config-bad-choice", *TRAIN, "--model.flavour", "gpt5", expect="must be one of"),
    case(
        "config-negative-width",
        *TRAIN,
        "--model.n_embd",
        "-16",
        expect="model.n_embd must be positive",
    ),
    case(
        "config-zero-batch", *TRAIN, "--training.micro_batch_size", "0", expect="must be positive"
    ),
    case(
        "config-negative-seq-len",
        *TRAIN,
        "--training.seq_len",
        "-1",
        expect="training.seq_len must be >= 0",
    ),
    case(
        "config-heads-do-not-divide",
        *TRAIN,
        "--model.n_head",
        "3",
        expect="must divide model.n_embd",
    ),
    case("config-seq-len-over-context", *TRAIN, "--training.seq_len", "99", expect="exceeds"),
    case("config-min-lr-above-lr", *TRAIN, "--optim.min_lr", "1", expect="optim.min_lr"),
    case("config-dropout-one", *TRAIN, "--model.dropout", "1", expect="model.dropout"),
    case(
        "config-label-smoothing-one",
        *TRAIN,
        "--training.label_smoothing",
        "1",
        expect="training.label_smoothing",
    ),
    case(
        "config-slow-ranks", *TRAIN, "--training.slow_ranks", "fast", expect="training.slow_ranks"
    ),
    case("config-override-without-value", *TRAIN, "--training.steps", expect="needs a value"),
    case("config-positional-argument", *TRAIN, "extra", expect="unexpected argument"),
    case("config-init-from-not-hf", *TRAIN, "--model.init_from", "gpt2", expect="hf:DIR"),
    *[
        case(f"config-moe-{id}", *TRAIN, "--model.flavour=llama", *argv, expect=expect)
        for id, argv, expect in [
            ("top-k-over-experts", ["--model.moe_experts=4", "--model.moe_top_k=5"], "exceeds"),
            ("key-without-experts", ["--model.moe_top_k=1"], "set model.moe_experts > 0"),
            ("bad-layers", ["--model.moe_experts=4", "--model.moe_layers=every:x"], "moe_layers"),
            ("layers-out-of-range", ["--model.moe_experts=4", "--model.moe_layers=7"], "n_layer"),
            (
                "with-sequence-parallel",
                ["--model.moe_experts=4", "--parallel.tp=2", "--parallel.sequence_parallel=true"],
                "sequence_parallel = false",
            ),
            (
                "experts-not-divisible-by-ep",
                ["--model.moe_experts=4", "--parallel.ep=3", "--parallel.data_parallel=zero2"],
                "not divisible by parallel.ep",
            ),
            (
                "ep-not-dividing-dp",
                ["--model.moe_experts=4", "--parallel.ep=4", "--parallel.data_parallel=zero2"]
                + ["--nproc", "2"],
                "must divide the data-parallel",
            ),
            (
                "ep-under-ddp",
                ["--model.moe_experts=4", "--parallel.ep=2", "--nproc", "2"],
                "FSDP over the experts",
            ),
            (
                "ep-with-load-balance",
                ["--model.moe_experts=4", "--parallel.ep=2", "--parallel.data_parallel=zero2"]
                + ["--parallel.load_balance=true", "--nproc", "2"],
                "parallel.load_balance",
            ),
            (
                "aux-loss-in-pipeline",
                ["--model.moe_experts=4", "--model.moe_balance=aux_loss", "--parallel.pp=2"],
                "aux_free or parallel.pp = 1",
            ),
            ("ep-without-experts", ["--parallel.ep=2"], "set model.moe_experts > 0 or parallel.ep"),
        ]
    ],
    case("config-moe-gpt2", *TRAIN, "--model.moe_experts=4", expect="flavour = llama"),
    case(
        "config-layout-in-process", *TRAIN, "--parallel.data_parallel", "hsdp", expect="hsdp needs"
    ),
    case("config-unknown-command", "trian", expect="unknown command"),
]

CORPORA = [
    case(
        "corpus-missing-file",
        "prepare",
        "{tmp}/missing.txt",
        "--out",
        "{tmp}/out",
        expect="does not exist",
    ),
    case(
        "corpus-empty-file",
        "prepare",
        "{tmp}/empty.txt",
        "--out",
        "{tmp}/out",
        setup=write("empty.txt", ""),
    ),
    case(
        "corpus-whitespace-only",
        "prepare",
        "{tmp}/blank.txt",
        "--out",
        "{tmp}/out",
        setup=write("blank.txt", " \n\n\t\n"),
    ),
    case(
        "corpus-binary-junk",
        "prepare",
        "{tmp}/junk.bin",
        "--out",
        "{tmp}/out",
        setup=write("junk.bin", bytes(range(256)) * 64),
        expect="UTF-8",
    ),
    case(
        "corpus-directory-without-text",
        "prepare",
        "{tmp}/texts",
        "--out",
        "{tmp}/out",
        setup=write("texts/.hidden", "not read"),
        expect="holds no files",
    ),
    case(
        "corpus-glob-matches-nothing",
        "prepare",
        "{tmp}/*.nothing",
        "--out",
        "{tmp}/out",
        expect="matches no files",
    ),
    case(
        "corpus-val-fraction",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--val-fraction",
        "2",
        setup=write("a.txt", "some text\n" * 50),
        expect="--val-fraction",
    ),
    case(
        "corpus-shard-tokens-zero",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--shard-tokens",
        "0",
        setup=write("a.txt", "some text\n" * 50),
        expect="--shard-tokens",
    ),
    case(
        "corpus-workers-zero",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--workers",
        "0",
        setup=write("a.txt", "some text\n" * 50),
        expect="--workers",
    ),
    case(
        "corpus-bpe-vocab-negative",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "-5",
        setup=write("a.txt", "some text\n" * 50),
        expect="vocabulary size -5",
    ),
    case(
        "corpus-tokenizer-missing",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--tokenizer",
        "{tmp}/missing.json",
        setup=write("a.txt", "some text\n" * 50),
    ),
    case(
        "corpus-tokenizer-junk",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--tokenizer",
        "{tmp}/tok.json",
        setup=both(write("a.txt", "some text\n" * 50), write("tok.json", "{not a tokenizer")),
    ),
    case(
        "corpus-tokenizer-hf-missing",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--tokenizer",
        "hf:{tmp}/nohf",
        setup=write("a.txt", "some text\n" * 50),
    ),
    case(
        "corpus-out-holds-other-data",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/data",
        setup=both(write("a.txt", "other text\n" * 50), copy_of("data", "data")),
        expect="--force",
    ),
]

PREPARED = [
    case("data-missing-dir", *TRAIN[:2], "{tmp}/missing", *TRAIN[3:], expect="no prepared data"),
    case("data-is-a-task", *TRAIN[:2], "{task}", *TRAIN[3:], expect="labelled task"),
    *[
        case(
            f"data-{name}",
            *TRAIN[:2],
            "{tmp}/data",
            *TRAIN[3:],
            setup=copy_of("data", "data", change),
            expect=expect,
        )
        for name, change, expect in [
            ("manifest-junk", replace("manifest.json", "not json"), "malformed"),
            ("manifest-truncated", truncate("manifest.json"), "malformed"),
            ("manifest-invalid-utf8", replace("manifest.json", b"\xff\xfe{}"), "manifest.json"),
            ("manifest-list", replace("manifest.json", "[]"), "malformed"),
            ("manifest-deeply-nested", replace("manifest.json", DEEP), "manifest.json"),
            ("shard-missing", remove("train_00000.bin"), "train_00000.bin"),
            ("shard-corrupt", flip_byte("train_00000.bin"), "sha256"),
            ("tokenizer-missing", remove("tokenizer.json"), "tokenizer.json"),
        ]
    ],
    *[
        case(
            f"data-unverified-{name}",
            *TRAIN[:2],
            "{tmp}/data",
            *TRAIN[3:],
            "--data.verify",
            "false",
            setup=copy_of("data", "data", change),
            expect=expect,
        )
        for name, change, expect in [
            ("shard-missing", remove("train_00000.bin"), "train_00000.bin"),
            ("shard-truncated", truncate("train_00000.bin"), "wrong size"),
            ("tokenizer-missing", remove("tokenizer.json"), "tokenizer.json"),
        ]
    ],
]


def task(id: str, content: bytes | str, expect: str = "") -> object:
    return case(
        id,
        "prepare",
        "--task",
        "jsonl:{tmp}/task.jsonl",
        "--out",
        "{tmp}/out",
        setup=write("task.jsonl", content),
        expect=expect,
    )


TASKS = [
    task("task-invalid-json", '{"text": "a", "label": \n', "not valid JSON"),
    task("task-missing-label", jsonl({"text": "a"}), 'no "label"'),
    task("task-missing-text", jsonl({"label": "a"}), 'no "text"'),
    task("task-not-an-object", jsonl([1, 2]), "not a JSON object"),
    task("task-deeply-nested", DEEP + "\n", "line 1"),
    task("task-empty-file", "", "holds no examples"),
    task("task-blank-lines-only", "\n\n  \n", "holds no examples"),
    task("task-invalid-utf8", b'{"text": "\xff", "label": "a"}\n', "UTF-8"),
    task(
        "task-mixed-label-types",
        jsonl({"text": "a", "label": "x"}, {"text": "b", "label": 1}),
        "mix",
    ),
    task("task-bad-split", jsonl({"text": "a", "label": "x", "split": "dev"}), '"split"'),
    task("task-empty-text", jsonl({"text": "", "label": "x"}), "non-empty string"),
    task("task-bool-label", jsonl({"text": "a", "label": True}), '"label"'),
    case(
        "task-missing-file", "prepare", "--task", "jsonl:{tmp}/missing.jsonl", "--out", "{tmp}/out"
    ),
    case("task-unknown-kind", "prepare", "--task", "poems", "--out", "{tmp}/out", expect="--task"),
    case(
        "task-with-input",
        "prepare",
        "{tmp}/a.txt",
        "--task",
        "play-classification",
        "--out",
        "{tmp}/out",
        setup=write("a.txt", "text\n"),
        expect="takes no INPUT",
    ),
]

LAUNCH = [
    case("launch-nproc-negative", *TRAIN, "--nproc", "-1", expect="--nproc"),
    case(
        "launch-nnodes-not-a-number", *TRAIN, "--nproc", "2", "--nnodes", "two", expect="--nnodes"
    ),
    case("launch-nnodes-zero", *TRAIN, "--nproc", "2", "--nnodes", "0", expect="at least 1 node"),
    case(
        "launch-nodes-without-endpoint",
        *TRAIN,
        "--nproc",
        "2",
        "--nnodes",
        "2",
        expect="--rdzv-endpoint",
    ),
    case(
        "launch-max-restarts-negative",
        *TRAIN,
        "--nproc",
        "2",
        "--max-restarts",
        "-1",
        expect="--max-restarts",
    ),
    case(
        "launch-rdzv-conf-malformed",
        *TRAIN,
        "--nproc",
        "2",
        "--rdzv-conf",
        "timeout",
        expect="--rdzv-conf",
    ),
    case(
        "launch-preflight-missing-data",
        *TRAIN[:2],
        "{tmp}/missing",
        *TRAIN[3:],
        "--nproc",
        "2",
        expect="no prepared data",
        subprocess=True,
    ),
    case(
        "launch-preflight-layout",
        *TRAIN,
        "--nproc",
        "2",
        "--parallel.data_parallel",
        "hsdp",
        expect="hsdp needs",
        subprocess=True,
    ),
    case(
        "launch-preflight-shard-missing",
        *TRAIN[:2],
        "{tmp}/data",
        *TRAIN[3:],
        "--nproc",
        "2",
        setup=copy_of("data", "data", remove("val_00000.bin")),
        expect="val_00000.bin",
        subprocess=True,
    ),
    case(
        "launch-preflight-task-missing",
        "finetune",
        *TINY,
        "--task",
        "{tmp}/missing",
        "--training.out_dir",
        "{tmp}/out",
        "--nproc",
        "2",
        expect="no labelled task",
        subprocess=True,
    ),
    case(
        "launch-worker-finds-corrupt-shard",
        *TRAIN[:2],
        "{tmp}/data",
        *TRAIN[3:],
        "--nproc",
        "2",
        setup=copy_of("data", "data", flip_byte("train_00000.bin")),
        expect="sha256",
        subprocess=True,
        timeout=240,
    ),
    case(
        "env-world-size-alone",
        *TRAIN,
        env={"WORLD_SIZE": "2"},
        expect="MASTER_ADDR",
        subprocess=True,
    ),
    case(
        "env-world-size-not-a-number",
        *TRAIN,
        env={**RANKS, "WORLD_SIZE": "two"},
        expect="WORLD_SIZE",
        subprocess=True,
    ),
    case(
        "env-world-size-zero",
        *TRAIN,
        env={**RANKS, "WORLD_SIZE": "0"},
        expect="WORLD_SIZE",
        subprocess=True,
    ),
    case(
        "env-rank-outside-world", *TRAIN, env={**RANKS, "RANK": "5"}, expect="RANK", subprocess=True
    ),
    case(
        "env-local-rank-not-a-number",
        *TRAIN,
        env={**RANKS, "LOCAL_RANK": "first"},
        expect="LOCAL_RANK",
        subprocess=True,
    ),
    case(
        "env-mpi-without-size",
        *TRAIN,
        env={"OMPI_COMM_WORLD_RANK": "0"},
        expect="OMPI_COMM_WORLD_SIZE",
        subprocess=True,
    ),
    case(
        "env-mpi-size-not-a-number",
        *TRAIN,
        env={
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "x",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29512",
        },
        expect="WORLD_SIZE",
        subprocess=True,
    ),
    case(
        "env-mpi-several-nodes-without-master",
        *TRAIN,
        env={"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"},
        expect="MASTER_ADDR",
        subprocess=True,
    ),
]

SIGNALS = [
    case(
        "signal-interrupt-while-starting",
        *TRAIN,
        "--training.steps",
        "100000",
        signal_after="out/heartbeat",
        prefix="interrupted",
        may_change=("out", "out/*", "out/*/*"),
        subprocess=True,
    ),
]

DISKS = [
    case(
        "disk-out-dir-is-a-file",
        *TRAIN,
        "--training.out_dir",
        "{tmp}/f",
        setup=write("f", "x"),
        expect="out_dir",
    ),
    case(
        "disk-out-dir-under-a-file",
        *TRAIN,
        "--training.out_dir",
        "{tmp}/f/out",
        setup=write("f", "x"),
        expect="out_dir",
    ),
    case(
        "disk-data-dir-is-a-file",
        *TRAIN[:2],
        "{tmp}/f",
        *TRAIN[3:],
        setup=write("f", "x"),
        expect="no prepared data",
    ),
    case(
        "disk-prepare-out-is-a-file",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/f",
        setup=both(write("a.txt", "text\n" * 40), write("f", "x")),
        expect="--out",
    ),
    case(
        "disk-prepare-out-under-a-file",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/f/out",
        setup=both(write("a.txt", "text\n" * 40), write("f", "x")),
        expect="--out",
    ),
    case(
        "disk-task-out-is-a-file",
        "prepare",
        "--task",
        "play-classification",
        "--out",
        "{tmp}/f",
        setup=write("f", "x"),
        expect="--out",
    ),
    case(
        "disk-finetune-out-is-a-file",
        "finetune",
        *TINY,
        "--task",
        "{task}",
        "--training.out_dir",
        "{tmp}/f",
        setup=write("f", "x"),
        expect="out_dir",
    ),
    case(
        "disk-export-out-is-a-file",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/f",
        setup=write("f", "x"),
        expect="--out",
    ),
    case(
        "disk-export-out-under-a-file",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/f/hf",
        setup=write("f", "x"),
        expect="--out",
    ),
    case(
        "disk-eval-data-dir-is-a-file",
        "eval",
        "--checkpoint",
        "{ckpt}",
        "--data-dir",
        "{tmp}/f",
        setup=write("f", "x"),
        expect="no prepared data",
    ),
]

CASES = [
    *CONFIGS,
    *CORPORA,
    *PREPARED,
    *TASKS,
    *LAUNCH,
    *SIGNALS,
    *DISKS,
    *RUN_CASES,
    *HARDENING,
    *TRANSLATION,
    *LONG_CONTEXT,
    *DATA_CASES,
]
