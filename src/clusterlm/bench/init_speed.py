"""`bench init`: per rank, the time and the host memory from the start of the job until the
model is parallelized, materialized and has its optimizers, ready for the first step.

Memory is the process's peak resident set (``ru_maxrss``) against what it was before the model
was built (the interpreter, torch and the config: a fixed overhead), and against the rank's share
of the fp32 parameters, the one figure sharding is meant to bound.
"""

from __future__ import annotations

import resource
import time
from functools import partial

import torch
from torch.distributed.tensor import DTensor

from clusterlm.config import Config, apply_overrides
from clusterlm.data.manifest import load_manifest
from clusterlm.distributed.json_collectives import all_gather_json
from clusterlm.distributed.runtime import setup_runtime
from clusterlm.parallel import parallelize
from clusterlm.parallel.precision import settle_precision
from clusterlm.train.optim import optimizer_recipe
from clusterlm.train.pretrained_weights import pretrained_source
from clusterlm.train.session import build_model


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure_init(cfg: Config) -> dict[str, float]:
    """This rank's figures: seconds to ready, RSS before, peak RSS, and its fp32 parameter share."""
    before = _rss_bytes()
    start = time.perf_counter()
    runtime = setup_runtime(cfg)
    precision = settle_precision(cfg.training.precision, runtime.device, runtime.is_main)
    cfg = apply_overrides(cfg, {"training.precision": precision})
    vocab = cfg.model.vocab_size or load_manifest(cfg.data.dir).vocab_size
    plain, source = build_model(cfg, vocab)
    source = (
        pretrained_source(cfg) or source
    )  # model.init_from: measure reading the pretrained shards
    model = parallelize(plain, cfg, runtime.mesh, runtime.device, source)
    model.build_optimizers(partial(optimizer_recipe, cfg=cfg.optim))
    seconds = time.perf_counter() - start
    share = (
        sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel()
            for part in model.parts
            for p in part.parameters()
        )
        * 4
    )
    return {
        "rank": runtime.rank,
        "seconds": seconds,
        "rss_before": before,
        "peak_rss": _peak_rss_bytes(),
        "param_share": share,
    }


def bench_init(cfg: Config) -> list[str]:
    """The report's lines on rank 0, none elsewhere (every rank measures itself)."""
    mine = measure_init(cfg)
    ranks = all_gather_json(mine)
    if mine["rank"] != 0:
        return []
    gib = 2**30
    lines = [
        f"init: {cfg.model.flavour} {cfg.model.n_layer}x{cfg.model.n_embd}, "
        f"{cfg.parallel.data_parallel} tp{cfg.parallel.tp} pp{cfg.parallel.pp}, "
        f"{len(ranks)} rank(s), "
        f"device {torch.device(cfg.training.device) if cfg.training.device != 'auto' else 'auto'}",
        "rank  ready s  RSS before GiB  peak RSS GiB  fp32 share GiB  (peak - before) / share",
    ]
    for r in ranks:
        growth = (
            (r["peak_rss"] - r["rss_before"]) / r["param_share"]
            if r["param_share"]
            else float("nan")
        )
        lines.append(
            f"{r['rank']:>4}  {r['seconds']:>7.2f}  {r['rss_before'] / gib:>14.2f}  "
            f"{r['peak_rss'] / gib:>12.2f}  {r['param_share'] / gib:>14.2f}  {growth:>8.2f}x"
        )
    return lines
