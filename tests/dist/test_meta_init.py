"""Meta-device initialization: every layout materializes only its share of each parameter, and
the shares together are exactly (bitwise) the single-process model with the same seed."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from clusterlm.config import build_config
from clusterlm.models import Transformer
from clusterlm.parallel import parallelize
from clusterlm.parallel.materialize import canonical_name
from clusterlm.distributed.runtime import setup_runtime
from clusterlm.train.session import build_model

from .helpers import run_distributed

VOCAB = 67  # odd: uneven FSDP and vocabulary shards
MODEL = {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 32, "model.block_size": 16,
         "model.vocab_size": VOCAB, "training.micro_batch_size": 4, "training.precision": "fp32"}
CASES = [
    ("ddp", 2, {"parallel.data_parallel": "ddp"}),
    ("zero3", 2, {"parallel.data_parallel": "zero3"}),
    ("tp", 2, {"parallel.tp": 2, "parallel.data_parallel": "ddp"}),
    ("pp-tied", 2, {"parallel.pp": 2, "parallel.data_parallel": "ddp"}),
    ("tp-zero3", 4, {"parallel.tp": 2, "parallel.data_parallel": "zero3"}),
    ("3d", 8, {"parallel.pp": 2, "parallel.tp": 2, "parallel.data_parallel": "zero3"}),
]


def _materialized(rank: int, world_size: int, values: dict) -> dict[str, tuple[torch.Tensor, int]]:
    """This rank's parameters as whole tensors, with how many elements it holds of each."""
    cfg = build_config(None, values)
    runtime = setup_runtime(cfg)
    plain, source = build_model(cfg, VOCAB)
    model = parallelize(plain, cfg, runtime.mesh, runtime.device, source)
    found = {}
    for part in model.parts:
        for name, param in part.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            found[canonical_name(name, plain.args.tie_embeddings)] = (whole.detach().clone(), local.numel())
    return found


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("name,world_size,layout", CASES, ids=[c[0] for c in CASES])
def test_every_layout_starts_from_the_single_process_weights(name, world_size, layout, flavour):
    if flavour == "llama" and name not in ("pp-tied", "tp-zero3"):
        pytest.skip("llama adds an untied head (pp) and grouped KV heads (tp-zero3); the rest is gpt2's")
    values = {**MODEL, **layout, "model.flavour": flavour, "model.n_kv_head": 2 if flavour == "llama" else 0}
    ranks = run_distributed(_materialized, world_size, values, timeout=180)
    cfg = build_config(None, values)
    reference = Transformer(build_model(cfg, VOCAB)[0].args)
    reference.reset_parameters(cfg.training.seed)
    expected = dict(reference.named_parameters())
    seen = set()
    for found in ranks:
        for key, (whole, _) in found.items():
            assert torch.equal(whole, expected[key].detach()), f"{name}: {key} differs from one process"
            seen.add(key)
    assert seen == set(expected)
    if name in ("zero3", "tp", "tp-zero3", "3d"):  # each rank allocated a share, not the whole
        held = sum(count for found in ranks for _, count in found.values())
        total = sum(p.numel() for p in expected.values())
        assert max(sum(c for _, c in found.values()) for found in ranks) < total
        assert held >= total


def test_meta_model_allocates_nothing_until_materialized():
    cfg = build_config(None, MODEL)
    plain, source = build_model(cfg, VOCAB)
    assert all(p.is_meta for p in plain.parameters())
    model = parallelize(plain, cfg, None, torch.device("cpu"), source)
    part = model.parts[0]
    assert not any(p.is_meta for p in part.parameters())
    assert part.output.weight is part.tok_embeddings.weight  # the tie survives materialization
