"""`bench train` under context parallelism reports the activations a rank keeps and the
attention's communication: seconds exposed and the bytes the planner counts."""

import re

from train_helpers import TINY_ARGS

from clusterlm.cli import main as cli
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.context_comm import sent_bytes_per_layer
from clusterlm.plan.layout import Layout
from clusterlm.plan.workload import Workload


def test_bench_train_reports_the_ring_traffic(data_dir, capfd):
    argv = ["bench", "train", "--nproc", "2", "--steps=2", "--rounds=1", "--warmup=1"]
    settings = ["--model.flavour", "llama", "--parallel.cp", "2", "--model.dropout", "0"]
    assert cli([*argv, "--data.dir", str(data_dir), *TINY_ARGS, *settings]) == 0
    out = capfd.readouterr().out
    assert "activations per layer per micro-batch (rank 0)" in out
    line = next(line for line in out.splitlines() if line.startswith("attention communication"))
    match = re.search(
        r"\(ring, cp=2, rank 0\): ([0-9.]+) ms/step exposed .* ([0-9.]+) MiB sent", line
    )
    assert match is not None, line
    # 2 layers, micro-batches of 4 windows of 32 tokens, 2 heads of 16, fp32.
    args = ModelArgs(
        flavour="llama", vocab_size=65, block_size=32, n_layer=2, n_head=2, n_kv_head=2,
        n_embd=32, ffn_hidden=96, dropout=0.0,
    )  # fmt: skip
    sent = 2 * sent_bytes_per_layer(
        Workload(args, 32, 128, "fp32"), Layout(cp=2, micro_batch_size=4)
    )
    assert float(match.group(2)) == round(sent / 2**20, 2)
