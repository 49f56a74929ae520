"""The command layer: every command's argument parsing and printing, and nothing else.

``clusterlm <command>`` dispatches to ``clusterlm.cli.<module>``; each exposes ``main(argv) -> int``
with its own argparse parser and calls library functions that take typed arguments, so
``clusterlm train --help`` lists exactly that command's options. Bad input raises ``UserError``,
printed here as one line with exit status 2; a worker of the launcher's agent hands the line to the
agent instead, which prints it once for the job (``clusterlm.launch.worker_errors``).
"""

from __future__ import annotations

import importlib
import sys

from clusterlm.errors import UserError
from clusterlm.launch.worker_errors import EXIT_USER_ERROR, report_to_agent

# subcommand -> (module with main(argv), one-line description)
COMMANDS = {
    "prepare": ("clusterlm.cli.prepare", "tokenize a corpus into checksummed token shards"),
    "train": ("clusterlm.cli.train", "train a model from a config (TOML + dotted overrides)"),
    "finetune": (
        "clusterlm.cli.finetune",
        "fine-tune a pretrained model on a labelled task (classification)",
    ),
    "eval": ("clusterlm.cli.evaluate", "validation loss and perplexity of a checkpoint"),
    "generate": ("clusterlm.cli.generate", "sample text from a checkpoint"),
    "translate": ("clusterlm.cli.translate", "translate lines of text with an encoder-decoder run"),
    "bench": ("clusterlm.cli.bench", "benchmarks that print figures (subcommands below)"),
    "plan": (
        "clusterlm.cli.plan",
        "predict memory, step time and MFU on a cluster; pick the layout",
    ),
    "submit": (
        "clusterlm.cli.submit",
        "submit a training job to Slurm (--dry-run prints the sbatch script)",
    ),
    "jobs": ("clusterlm.cli.jobs", "your clusterlm jobs in Slurm: state, step, loss, ETA"),
    "cancel": ("clusterlm.cli.cancel", "cancel one of your clusterlm jobs in Slurm"),
    "export": ("clusterlm.cli.export", "export a checkpoint (subcommands below)"),
    "average": (
        "clusterlm.cli.average",
        "average the weights of a run's last checkpoints into a new checkpoint",
    ),
    "chaos": (
        "clusterlm.cli.chaos",
        "kill random ranks of a job; check it recovers to the same weights",
    ),
}

# command -> subcommand -> one-line description
SUBCOMMANDS = {
    "bench": {
        "train": (
            "tokens/s, ms/step, MFU and peak memory of a config; --against times a baseline "
            "beside it"
        ),
        "init": (
            "per rank, the time and host memory until the model is parallelized and ready to step"
        ),
        "comm": "all-reduce algorithms timed over a range of sizes on N local processes",
        "convergence": "one token budget: synchronous, parameter server, local SGD and DiLoCo",
        "checkpoint": "the stall a save costs the training loop, in line and in the background",
        "speedrun": "wall time to a target validation loss for a config and a baseline",
        "compare-deepspeed": "zero1-3 against DeepSpeed's ZeRO on the same model and batches",
        "prepare": "`prepare` at several --nproc on a generated corpus; outputs compared",
    },
    "export": {"hf": "a Hugging Face model directory (config.json, safetensors, tokenizer)"},
}


def usage() -> str:
    lines = [
        "usage: clusterlm <command> [options]   (clusterlm <command> --help for its options)",
        "",
    ]
    for name, (_, desc) in COMMANDS.items():
        lines.append(f"  {name:<9} {desc}")
        lines += [f"    {name} {sub:<18} {text}" for sub, text in SUBCOMMANDS.get(name, {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as err:
        if not report_to_agent(str(err)):
            print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
