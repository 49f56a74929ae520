"""The bad-input corpus, part two: checkpoints, Hugging Face directories, fine-tuning, and the
commands that read a run or plan, time, submit, list or break one (``bad_inputs_table.py`` says
how an entry reads)."""

from __future__ import annotations

from bad_inputs_harness import (
    TINY,
    both,
    case,
    copy_of,
    edit_json,
    flip_byte,
    remove,
    replace,
    truncate,
    write,
)

DEEP = "[" * 100_000
TRAIN = ("train", "--data.dir", "{data}", "--training.out_dir", "{tmp}/out", *TINY)
STEP = "checkpoints/step_00000002"
NO_SLURM = {"PATH": "{tmp}/bin"}  # a PATH without squeue, sbatch or scancel
SUBMIT = ("submit", "--scheduler", "slurm", "--nodes", "1", "--procs-per-node", "2", "--dry-run")


def _wrong_checksum(value: dict) -> None:
    value["sha256"]["trainer.json"] = "0" * 64


def _drop(key: str):
    return lambda value: value.__delitem__(key)


def _set(key: str, new: object):
    return lambda value: value.__setitem__(key, new)


CHECKPOINT_DAMAGE = [  # (name, change to a copy of the checkpoint, part of the line)
    ("missing-trainer-json", remove("trainer.json"), "trainer.json"),
    ("truncated-trainer-json", truncate("trainer.json"), "trainer.json"),
    ("nested-trainer-json", replace("trainer.json", DEEP), "trainer.json"),
    ("wrong-complete-checksum", edit_json("complete.json", _wrong_checksum), "sha256"),
    ("junk-complete-json", replace("complete.json", "junk"), "complete.json"),
    ("missing-shard-files", remove("*.distcp"), "distcp"),
    ("flipped-shard-byte", flip_byte("*.distcp"), "sha256"),
    ("missing-tokenizer", remove("tokenizer.json"), "tokenizer.json"),
]

CHECKPOINTS = [
    case(
        "ckpt-eval-run-missing", "eval", "--run", "{tmp}/missing", expect="no complete checkpoint"
    ),
    case("ckpt-eval-checkpoint-missing", "eval", "--checkpoint", "{tmp}/missing"),
    case(
        "ckpt-eval-run-without-checkpoints",
        "eval",
        "--run",
        "{tmp}/empty",
        setup=write("empty/metrics.jsonl", ""),
        expect="no complete checkpoint",
    ),
    *[
        case(
            f"ckpt-eval-{name}",
            "eval",
            "--checkpoint",
            "{tmp}/ckpt",
            setup=copy_of("ckpt", "ckpt", change),
            expect=expect,
        )
        for name, change, expect in CHECKPOINT_DAMAGE
    ],
    *[
        case(
            f"ckpt-generate-{name}",
            "generate",
            "--checkpoint",
            "{tmp}/ckpt",
            setup=copy_of("ckpt", "ckpt", change),
            expect=expect,
        )
        for name, change, expect in CHECKPOINT_DAMAGE[:6:2]
    ],
    *[
        case(
            f"ckpt-export-{name}",
            "export",
            "hf",
            "--checkpoint",
            "{tmp}/ckpt",
            "--out",
            "{tmp}/hf",
            setup=copy_of("ckpt", "ckpt", change),
            expect=expect,
        )
        for name, change, expect in CHECKPOINT_DAMAGE[1:6:2]
    ],
    *[
        case(
            f"ckpt-resume-{name}",
            *TRAIN,
            "--resume",
            "{tmp}/ckpt",
            setup=copy_of("ckpt", "ckpt", change),
            expect=expect,
        )
        for name, change, expect in CHECKPOINT_DAMAGE[:6:2]
    ],
    case("ckpt-resume-missing", *TRAIN, "--resume", "{tmp}/missing"),
    case(
        "ckpt-resume-other-model",
        *TRAIN,
        "--training.out_dir",
        "{tmp}/run",
        "--resume",
        "auto",
        "--model.n_layer",
        "2",
        setup=copy_of("run", "run"),
        expect="model.n_layer",
        may_change=("run/heartbeat/*",),
    ),  # an existing run's heartbeat files are rewritten
]

HF = [
    case("hf-missing-dir", *TRAIN, "--model.init_from", "hf:{tmp}/missing"),
    *[
        case(
            f"hf-{name}",
            *TRAIN,
            "--model.init_from",
            "hf:{tmp}/hf",
            setup=copy_of("hf", "hf", change),
            expect=expect,
        )
        for name, change, expect in [
            ("missing-config-json", remove("config.json"), "config.json"),
            (
                "malformed-config-json",
                replace("config.json", '{"model_type": "gpt2",'),
                "config.json",
            ),
            ("config-json-invalid-utf8", replace("config.json", b"\xff\xfe"), "config.json"),
            ("config-json-is-a-list", replace("config.json", "[1, 2]"), "config.json"),
            ("config-json-deeply-nested", replace("config.json", DEEP), "config.json"),
            ("unknown-architecture", edit_json("config.json", _set("model_type", "gpt5")), "gpt5"),
            (
                "unsupported-moe-architecture",
                edit_json("config.json", _set("model_type", "qwen3_moe")),
                "MixtralForCausalLM",
            ),
            ("config-json-lacks-a-size", edit_json("config.json", _drop("n_layer")), "n_layer"),
            (
                "config-json-size-is-text",
                edit_json("config.json", _set("n_layer", "two")),
                "n_layer",
            ),
            ("missing-weights", remove("*.safetensors"), "safetensors"),
            ("junk-weights", replace("model.safetensors", "not tensors"), "model.safetensors"),
            (
                "weights-lack-a-tensor",
                replace("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
                "lacks tensor",
            ),
        ]
    ],
    case(
        "hf-prepare-tokenizer-missing",
        "prepare",
        "{tmp}/a.txt",
        "--out",
        "{tmp}/out",
        "--tokenizer",
        "hf:{tmp}/hf",
        setup=both(
            write("a.txt", "some text\n" * 40), copy_of("hf", "hf", remove("tokenizer.json"))
        ),
    ),
    case(
        "hf-export-out-not-empty", "export", "hf", "--run", "{run}", "--out", "{hf}", expect="--out"
    ),
]

FINETUNE = [
    case("finetune-no-task", "finetune", *TINY, "--training.out_dir", "{tmp}/out", expect="--task"),
    *[
        case(
            f"finetune-{name}",
            "finetune",
            *TINY,
            "--training.out_dir",
            "{tmp}/out",
            *options,
            setup=setup,
            expect=expect,
        )
        for name, options, setup, expect in [
            ("task-missing", ("--task", "{tmp}/missing"), None, "no labelled task"),
            ("task-is-a-corpus", ("--task", "{data}"), None, "language-modelling corpus"),
            (
                "task-manifest-junk",
                ("--task", "{tmp}/task"),
                copy_of("task", "task", replace("manifest.json", "[")),
                "no labelled task",
            ),
            (
                "task-file-missing",
                ("--task", "{tmp}/task"),
                copy_of("task", "task", remove("train_tokens.bin")),
                "train_tokens.bin",
            ),
            (
                "init-from-missing",
                ("--task", "{task}", "--init-from", "{tmp}/missing"),
                None,
                "finetune.init_from",
            ),
            (
                "init-from-truncated-trainer-json",
                ("--task", "{task}", "--init-from", "{tmp}/run"),
                copy_of("run", "run", truncate(f"{STEP}/trainer.json")),
                "trainer.json",
            ),
            (
                "init-from-nested-trainer-json",
                ("--task", "{task}", "--init-from", "{tmp}/run"),
                copy_of("run", "run", replace(f"{STEP}/trainer.json", DEEP)),
                "trainer.json",
            ),
            (
                "init-from-twice",
                ("--task", "{task}", "--init-from", "{run}", "--model.init_from", "hf:{hf}"),
                None,
                "not both",
            ),
            (
                "freeze-too-many",
                ("--task", "{task}", "--finetune.freeze_layers", "9"),
                None,
                "freeze_layers",
            ),
        ]
    ],
]

READERS = [
    case(
        "eval-batches-negative",
        "eval",
        "--checkpoint",
        "{ckpt}",
        "--batches",
        "-1",
        expect="--batches",
    ),
    case(
        "eval-split-unknown", "eval", "--checkpoint", "{ckpt}", "--split", "test", expect="--split"
    ),
    case(
        "eval-data-dir-missing",
        "eval",
        "--checkpoint",
        "{ckpt}",
        "--data-dir",
        "{tmp}/missing",
        expect="no prepared data",
    ),
    case("eval-device-unknown", "eval", "--checkpoint", "{ckpt}", "--device", "tpu", expect="tpu"),
    case(
        "generate-negative-tokens",
        "generate",
        "--checkpoint",
        "{ckpt}",
        "--max-new-tokens",
        "-1",
        expect=">= 0",
    ),
    case("generate-precision-unknown", "generate", "--checkpoint", "{ckpt}", "--precision", "fp8"),
    case(
        "generate-run-missing",
        "generate",
        "--run",
        "{tmp}/missing",
        expect="no complete checkpoint",
    ),
    case(
        "export-max-shard-size-nan",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/hf",
        "--max-shard-size",
        "nan",
        expect="'nan'",
    ),
    case(
        "export-max-shard-size-inf",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/hf",
        "--max-shard-size",
        "infGB",
        expect="'infGB'",
    ),
    case(
        "export-max-shard-size-zero",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/hf",
        "--max-shard-size",
        "0",
        expect="positive",
    ),
    case(
        "export-max-shard-size-unit",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/hf",
        "--max-shard-size",
        "5XB",
        expect="5XB",
    ),
    case("export-run-missing", "export", "hf", "--run", "{tmp}/missing", "--out", "{tmp}/hf"),
    case("export-no-format", "export", expect="FORMAT"),
    case("export-unknown-format", "export", "onnx", "--out", "{tmp}/o", expect="onnx"),
    case(
        "export-dtype-unknown",
        "export",
        "hf",
        "--run",
        "{run}",
        "--out",
        "{tmp}/hf",
        "--dtype",
        "fp8",
    ),
]

PLAN_MODEL = ("plan", "--model", "llama-8b")
PLANS = [
    case("plan-no-model", "plan", expect="--model"),
    case("plan-unknown-model", "plan", "--model", "llama-9000", expect="not found"),
    case("plan-unknown-cluster", *PLAN_MODEL, "--cluster", "1xABACUS", expect="1xABACUS"),
    case("plan-headroom-zero", *PLAN_MODEL, "--headroom", "0", expect="--headroom"),
    case("plan-top-zero", *PLAN_MODEL, "--top", "0", expect="--top"),
    case("plan-batch-not-a-size", *PLAN_MODEL, "--global-batch-tokens", "lots"),
    case("plan-train-tokens-not-a-size", *PLAN_MODEL, "--train-tokens", "lots"),
    case("plan-nodes-zero", *PLAN_MODEL, "--nodes", "0", expect="nodes"),
    case("plan-seq-negative", *PLAN_MODEL, "--seq", "-5", expect="--seq"),
    case(
        "plan-efficiency-negative", *PLAN_MODEL, "--efficiency", "-1", expect="compute_efficiency"
    ),
    case("plan-calibration-missing", *PLAN_MODEL, "--calibration", "{tmp}/missing.json"),
    case(
        "plan-calibration-junk",
        *PLAN_MODEL,
        "--calibration",
        "{tmp}/c.json",
        setup=write("c.json", "{junk"),
    ),
    case(
        "plan-model-toml-junk", "plan", "--model", "{tmp}/m.toml", setup=write("m.toml", "[model\n")
    ),
    case(
        "plan-cluster-toml-junk",
        *PLAN_MODEL,
        "--cluster",
        "{tmp}/c.toml",
        setup=write("c.toml", "[cluster\n"),
    ),
    case("plan-published-missing", "plan", "--published", "{tmp}/missing.toml"),
    case("plan-gpu-data-without-validate", "plan", "--gpu-data", expect="--validate"),
    case(
        "plan-emit-config-under-a-file",
        *PLAN_MODEL,
        "--emit-config",
        "{tmp}/f/best.toml",
        setup=write("f", "x"),
        expect="best.toml",
    ),
]

BENCH = [
    case("bench-no-subcommand", "bench", expect="subcommand"),
    case("bench-unknown-subcommand", "bench", "trian", expect="trian"),
    case("bench-train-steps-zero", "bench", *TRAIN, "--steps", "0", expect="--steps"),
    case("bench-train-against-malformed", "bench", *TRAIN, "--against", "fast", expect="--against"),
    case(
        "bench-train-against-unknown-key",
        "bench",
        *TRAIN,
        "--against",
        "optim.lrr=1",
        expect="optim.lrr",
    ),
    case(
        "bench-train-missing-data",
        "bench",
        *TRAIN[:2],
        "{tmp}/missing",
        *TRAIN[3:],
        expect="no prepared data",
    ),
    case(
        "bench-init-missing-data",
        "bench",
        "init",
        *TRAIN[1:2],
        "{tmp}/missing",
        *TRAIN[3:],
        expect="no prepared data",
    ),
    case(
        "bench-comm-unknown-algorithm",
        "bench",
        "comm",
        "--algorithms",
        "telepathy",
        expect="telepathy",
    ),
    case("bench-comm-sizes-not-sizes", "bench", "comm", "--sizes", "lots", expect="lots"),
    case("bench-comm-nproc-zero", "bench", "comm", "--nproc", "0", expect="--nproc"),
    case(
        "bench-checkpoint-saves-zero",
        "bench",
        "checkpoint",
        *TRAIN[1:],
        "--saves",
        "0",
        expect="--saves",
    ),
    case(
        "bench-convergence-nproc-zero",
        "bench",
        "convergence",
        "--out",
        "{tmp}/c",
        "--nproc",
        "0",
        expect="--nproc",
    ),
    case(
        "bench-convergence-unknown-run",
        "bench",
        "convergence",
        "--out",
        "{tmp}/c",
        "--runs",
        "telepathy",
        expect="telepathy",
    ),
    case(
        "bench-speedrun-config-missing",
        "bench",
        "speedrun",
        "--config",
        "{tmp}/missing.toml",
        expect="not found",
    ),
    case("bench-speedrun-rounds-zero", "bench", "speedrun", "--rounds", "0", expect="--rounds"),
    case(
        "bench-compare-unknown-stage",
        "bench",
        "compare-deepspeed",
        "--stages",
        "5",
        expect="--stages",
    ),
]

JOBS = [
    case(
        "submit-without-nodes",
        "submit",
        "--scheduler",
        "slurm",
        "--dry-run",
        "--",
        *TRAIN[1:],
        expect="--nodes",
    ),
    case("submit-nodes-zero", *SUBMIT[:3], "0", *SUBMIT[4:], "--", *TRAIN[1:], expect="--nodes"),
    case("submit-launch-option", *SUBMIT, "--", *TRAIN[1:], "--nproc", "2", expect="--nproc"),
    case("submit-resume", *SUBMIT, "--", *TRAIN[1:], "--resume", "auto", expect="--resume"),
    case(
        "submit-impossible-layout",
        *SUBMIT,
        "--",
        *TRAIN[1:],
        "--parallel.tp",
        "3",
        expect="parallel.tp",
    ),
    case(
        "submit-unknown-key",
        *SUBMIT,
        "--",
        *TRAIN[1:],
        "--training.stepz",
        "3",
        expect="training.steps",
    ),
    case("submit-time-unreadable", *SUBMIT, "--time", "forever", "--", *TRAIN[1:], expect="--time"),
    case("submit-grace-too-short", *SUBMIT, "--grace", "1", "--", *TRAIN[1:], expect="--grace"),
    case(
        "submit-unknown-scheduler",
        "submit",
        "--scheduler",
        "pbs",
        "--nodes",
        "1",
        "--procs-per-node",
        "1",
        expect="pbs",
    ),
    case("jobs-without-slurm", "jobs", env=NO_SLURM, expect="squeue"),
    case("jobs-extra-argument", "jobs", "--all", env=NO_SLURM, expect="--all"),
    case("cancel-without-slurm", "cancel", "123", env=NO_SLURM, expect="squeue"),
    case("cancel-job-not-a-number", "cancel", "abc", env=NO_SLURM, expect="abc"),
    case("cancel-without-job", "cancel", env=NO_SLURM, expect="job"),
    case("chaos-without-nproc", "chaos", *TRAIN[1:], expect="--nproc"),
    case("chaos-kills-zero", "chaos", *TRAIN[1:], "--nproc", "2", "--kills", "0", expect="--kills"),
    case(
        "chaos-without-heartbeats",
        "chaos",
        *TRAIN[1:],
        "--nproc",
        "2",
        "--parallel.hang_timeout_s",
        "0",
        expect="hang_timeout_s",
    ),
    case(
        "chaos-missing-data",
        "chaos",
        *TRAIN[1:2],
        "{tmp}/missing",
        *TRAIN[3:],
        "--nproc",
        "2",
        expect="no prepared data",
    ),
]

RUN_CASES = [*CHECKPOINTS, *HF, *FINETUNE, *READERS, *PLANS, *BENCH, *JOBS]
