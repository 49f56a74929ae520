"""Context-parallel layouts train exactly like one process through the trainer: losses every step,
validation loss and final weights (tolerances: training.py), for ring and all-to-all attention,
gpt2 and llama, with and without document masking, and composed with FSDP, tensor parallel and
pipelines (which also carry document masking alone).

The corpus is many short documents, so every window packs several."""

from __future__ import annotations

import pytest

from .training import MICRO, assert_equivalent, run

STEPS = {"training__steps": 6, "training__eval_interval": 3}
LLAMA = {"model__flavour": "llama", "model__n_head": 4, "model__n_kv_head": 2}
DOCS = {"data__document_masking": True, "model__position_reset": True}
RING, A2A = {"parallel__cp_attention": "ring"}, {"parallel__cp_attention": "all_to_all"}
CASES = [
    # (name, processes, data-parallel ranks, settings shared with the reference, cp settings)
    ("cp2-ring-gpt2", 2, 1, {}, {"parallel__cp": 2, **RING}),
    ("cp2-all_to_all-gpt2", 2, 1, {}, {"parallel__cp": 2, **A2A}),
    ("cp2-ring-llama", 2, 1, LLAMA, {"parallel__cp": 2, **RING}),
    ("cp2-all_to_all-llama", 2, 1, LLAMA, {"parallel__cp": 2, **A2A}),
    ("cp2-ring-gpt2-documents", 2, 1, DOCS, {"parallel__cp": 2, **RING}),
    ("cp2-all_to_all-llama-documents", 2, 1, {**LLAMA, **DOCS}, {"parallel__cp": 2, **A2A}),
    ("cp4-ring-llama-documents", 4, 1, {**LLAMA, **DOCS}, {"parallel__cp": 4, **RING}),
    ("cp4-all_to_all-llama", 4, 1, LLAMA, {"parallel__cp": 4, **A2A}),
    ("cp2xzero3", 4, 2, DOCS, {"parallel__cp": 2, "parallel__data_parallel": "zero3"}),
    (
        "cp2xzero3-all_to_all-llama-documents",
        4,
        2,
        {**LLAMA, **DOCS},
        {"parallel__cp": 2, "parallel__data_parallel": "zero3", **A2A},
    ),
    (
        "cp2xhsdp",
        4,
        2,
        {},
        {"parallel__cp": 2, "parallel__data_parallel": "hsdp", "parallel__dp_replicate": 2},
    ),
    (
        "cp2xddp2-checkpointing",
        4,
        2,
        LLAMA,
        {"parallel__cp": 2, "training__activation_checkpointing": "full"},
    ),
    (
        "pp2xcp2-llama-documents",
        4,
        1,
        {**LLAMA, **DOCS},
        {
            "parallel__cp": 2,
            "parallel__pp": 2,
            "parallel__pp_microbatches": 2,
            "parallel__data_parallel": "zero3",
        },
    ),
    (
        "pp2xcp2-gpt2-all_to_all",
        4,
        1,
        {},
        {
            "parallel__cp": 2,
            "parallel__pp": 2,
            "parallel__pp_microbatches": 2,
            "parallel__data_parallel": "zero3",
            **A2A,
        },
    ),
    (
        "pp2-interleaved-gpt2-documents",
        2,
        1,
        {**DOCS, "model__n_layer": 4},
        {
            "parallel__pp": 2,
            "parallel__pp_schedule": "interleaved_1f1b",
            "parallel__pp_microbatches": 2,
        },
    ),
    (
        "cp2xtp2-llama",
        4,
        1,
        {**LLAMA, **DOCS},
        {"parallel__cp": 2, "parallel__tp": 2, "parallel__data_parallel": "zero3"},
    ),
    (
        "cp2xtp2-all_to_all-gpt2",
        4,
        1,
        {"model__n_head": 4},
        {"parallel__cp": 2, "parallel__tp": 2, "parallel__data_parallel": "zero3", **A2A},
    ),
]


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    from clusterlm.cli import main as cli

    root = tmp_path_factory.mktemp("cp-corpus")
    files = []
    for i in range(120):
        path = root / f"doc{i:03d}.txt"
        path.write_text(f"to be or not {i * 7 % 13} " * (1 + i % 3))
        files.append(str(path))
    assert cli(["prepare", *files, "--out", str(root / "data"), "--workers", "1"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def references(documents_dir, tmp_path_factory):
    cache: dict = {}

    def get(sequences: int, settings: dict):
        key = (sequences, *sorted(settings.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("cp-ref")
            cache[key] = run(
                documents_dir, out, 1, training__micro_batch_size=sequences, **STEPS, **settings
            )
        return cache[key]

    return get


@pytest.mark.parametrize("name,world_size,dp,shared,cp", CASES, ids=[c[0] for c in CASES])
def test_context_parallel_equals_single_process(
    name, world_size, dp, shared, cp, documents_dir, references, tmp_path
):
    candidate = run(
        documents_dir,
        tmp_path,
        world_size,
        training__micro_batch_size=MICRO,
        **STEPS,
        **shared,
        **cp,
    )
    assert_equivalent(references(MICRO * dp, shared), candidate)


def test_a_context_parallel_run_resumes_on_one_process(documents_dir, tmp_path):
    """Saved by cp2 at step 3, resumed by one process: the same run as one process throughout."""
    schedule = {"optim__decay_steps": 6, "training__eval_interval": 3, **DOCS, **LLAMA}
    first = {"training__micro_batch_size": MICRO, "training__steps": 3, **schedule}
    run(documents_dir, tmp_path, 2, **first, parallel__cp=2)
    resumed = run(
        documents_dir, tmp_path, 1, **{**first, "training__steps": 6}, checkpoint__resume="auto"
    )
    whole = run(documents_dir, tmp_path / "whole", 1, **{**first, "training__steps": 6})
    assert sorted(resumed[0]) == list(range(1, 7))  # steps 1-3 by cp2, 4-6 by one process
    assert_equivalent(whole, resumed)
