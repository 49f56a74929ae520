"""What a translation run counts: its batches are trimmed to their longest pair, so the tokens,
tokens/s and MFU it reports count the positions it computes (each micro-batch's pairs times its
trimmed length, over every rank), and the FLOPs at that length, not ``seq_len`` per pair."""

import json

import pytest
from translation_pairs import TINY_TRANSLATION, prepare_pairs

from clusterlm.data.loader import TokenLoader
from clusterlm.data.translation import load_translation
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.models import training_flops_per_token
from clusterlm.models.from_config import resolve_model_args
from clusterlm.train.trainer import train
from clusterlm.train.translation_task import pair_stream, trimmed_step_work

MICRO, SEQ = 8, 32  # the pairs need at most 24 positions


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return prepare_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.mark.parametrize("flavour,block", [("mbart", SEQ), ("gpt2", 2 * SEQ)])
def test_step_work_is_what_every_rank_computes(task_dir, flavour, block):
    """Two data-parallel ranks, two micro-batches each: the step's positions are the sum of the
    four batches' pairs times their lengths, the FLOPs each batch's at its length, on either
    rank alike."""
    values = {**TINY_TRANSLATION, "data.dir": str(task_dir), "model.flavour": flavour,
              "model.block_size": block, "training.micro_batch_size": MICRO}  # fmt: skip
    cfg = load_config(None, values)
    task = load_translation(str(task_dir))
    stream = pair_stream(cfg, task.splits["train"], task.manifest, training=True)
    args = resolve_model_args(cfg, task.manifest.vocab_size)
    loaders = [TokenLoader(stream, block, MICRO, 2, rank, 2, seed=5) for rank in range(2)]
    for _ in range(6):
        work = [trimmed_step_work(stream, args, cfg, loader) for loader in loaders]
        lengths = [y.shape[1] for loader in loaders for _, y in loader.next_step()]
        assert work[0] == work[1]
        assert work[0][0] == MICRO * sum(lengths) < 4 * MICRO * block
        flops = sum(MICRO * n * training_flops_per_token(args, n) for n in lengths)
        assert work[0][1] == pytest.approx(flops, rel=1e-12)


def test_tokens_tokens_per_s_and_mfu_count_the_trimmed_positions(task_dir, tmp_path):
    out = tmp_path / "out"
    values = {**TINY_TRANSLATION, "data.dir": str(task_dir), "training.out_dir": str(out),
              "model.block_size": SEQ, "training.steps": 6, "training.log_interval": 1,
              "metrics.peak_flops": 1e12}  # fmt: skip
    train(load_config(None, values))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    tokens = [0] + [r["tokens"] for r in steps]
    vocab = load_translation(str(task_dir)).manifest.vocab_size
    args = resolve_model_args(load_config(None, values), vocab)
    for before, record in zip(tokens, steps, strict=False):
        computed = record["tokens"] - before
        assert 0 < computed < MICRO * SEQ and computed % MICRO == 0  # trimmed, whole pairs
        seconds = record["ms_per_step"] / 1000
        assert record["tokens_per_s"] * seconds == pytest.approx(computed, rel=1e-9)
        flops_per_token = record["mfu"] * 1e12 / record["tokens_per_s"]
        assert flops_per_token == pytest.approx(training_flops_per_token(args, computed // MICRO))
