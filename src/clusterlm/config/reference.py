"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

    python -m clusterlm.config.reference > docs/configuration.md

Every section of ``Config`` and every key in it, with its type, default and the meaning its
``help`` metadata gives (the text ``clusterlm train --help`` prints). A test checks that the
committed page equals what this prints, so a new key, default or help text is one edit in
``sections.py`` (or ``parallelism.py``) followed by regenerating the page.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clusterlm.config.sections import Config

REGENERATE = "python -m clusterlm.config.reference > docs/configuration.md"

# One line per section for the page; a section without one is listed with its keys only.
SECTION_NOTES = {
    "model": "The architecture and its shape. `model.init_from` starts from a Hugging Face "
    "model's weights and shape.",
    "data": "Which prepared dataset to read (`clusterlm prepare --out`), and whether to verify it.",
    "training": "The run: steps, batch, sequence, precision, kernels, evaluation, logging and "
    "where it all goes.",
    "optim": "The optimizer and its learning-rate schedule (linear warm-up, then the decay).",
    "parallel": "How the job is laid out on its processes: the data-parallel strategy, tensor "
    "and pipeline parallelism, the asynchronous strategies, timeouts and the hang "
    "watchdog.",
    "comm": "Gradient communication: clusterlm's own all-reduce algorithms and compression "
    "(ddp, zero1) and the reduce-scatter the sharded strategies use.",
    "checkpoint": "When checkpoints are saved, how many are kept, resuming, background saves "
    "and preemption.",
    "metrics": "What a run reports and where: progress display, metrics.jsonl, TensorBoard, "
    "Prometheus, system samples, stragglers.",
    "finetune": "`clusterlm finetune`: the labelled task, the pretrained model, frozen layers "
    "and the head's learning rate.",
}

INTRO = """\
One typed config tree, loaded from a TOML file (presets in `configs/`) and overridden on the
command line with dotted keys:

```bash
clusterlm train --config configs/nano-cpu.toml --training.steps 500 --optim.lr 3e-4
```

A TOML file holds one `[section]` table per section below. `clusterlm train --help` prints every
key with its default and meaning, and `clusterlm train --config FILE --print-config` prints the
resolved config. An unknown key fails with the closest valid key suggested; a value of the wrong
type, or outside a key's choices, fails naming the key; impossible combinations (a non-positive
learning rate, heads that do not divide the width, a sequence longer than the model's context, a
layout the job's size cannot run, ...) fail at start with one line.

The presets are described in [Models and interoperability](models-and-interop.md#presets).
"""


def sections() -> list[tuple[str, Any]]:
    """(name, default instance) of every section of ``Config``, in declaration order."""
    return [(f.name, _default(f)) for f in dataclasses.fields(Config)]


def _default(section: dataclasses.Field) -> Any:
    """A section's default instance, which its ``default_factory`` builds."""
    factory = section.default_factory
    assert callable(factory)  # every section of Config has one
    return factory()


def render_value(value: Any) -> str:
    """A default as it is written in a TOML file: true/false, numbers, quoted strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_type(field: dataclasses.Field) -> str:
    """The key's type as its values are coerced (bool, int, float, str), with its choices."""
    kind = type(field.default).__name__
    choices = field.metadata.get("choices")
    if not choices:
        return kind
    return f"{kind}: " + ", ".join(f"`{choice}`" for choice in choices)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def render_section(name: str, section: Any) -> str:
    """One section: its heading, its note and a table of its keys."""
    lines = [f"## `{name}`", ""]
    if SECTION_NOTES.get(name):
        lines += [SECTION_NOTES[name], ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(section):
        default = f"`{render_value(getattr(section, field.name))}`"
        meaning = _cell(field.metadata.get("help", ""))
        lines.append(
            f"| `{name}.{field.name}` | {_cell(render_type(field))} | {default} | {meaning} |"
        )
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """The whole page: title, how configs load, an index of the sections, then each section."""
    parts = [
        "# Configuration reference",
        "",
        (
            "<!-- Generated from the config dataclasses (src/clusterlm/config/sections.py); "
            "do not edit."
        ),
        f"     Regenerate with: {REGENERATE} -->",
        "",
        INTRO,
        "Sections: " + ", ".join(f"[`{name}`](#{name})" for name, _ in sections()) + ".",
        "",
    ]
    body = "\n".join(render_section(name, section) for name, section in sections())
    return "\n".join(parts) + "\n" + body


if __name__ == "__main__":
    print(render_reference(), end="")
