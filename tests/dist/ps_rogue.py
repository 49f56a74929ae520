"""A rogue process that goes after a running parameter-server job through its store:
``python ps_rogue.py outsider|insider HOST:PORT PREFIX SHARD_SIZE METRICS``: the store's address,
the job's key prefix (``clusterlm-ps/<attempt>/``), the one server's shard size and the job's
metrics file. It waits until the job has logged a training step, then attacks, and prints a JSON
report of what it got.

* ``outsider``: a local process without the job's secret. It joins as "worker 0" four times,
  twice with a join signed by a secret of its own and twice unsigned, to pull the parameters
  and to push a NaN gradient, a NaN learning rate and a gradient of the wrong size.
* ``insider``: a process with the job's secret (CLUSTERLM_JOB_SECRET), a worker gone wrong.
  It joins as worker 7, reads the parameters, and pushes a NaN gradient, a NaN learning rate, a
  negative one and a short gradient (each should be rejected, its connection kept), then one
  larger than the shard (rejected, its connection closed).
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from clusterlm.distributed.job_secret import job_secret
from clusterlm.distributed.signing import SignedStore, answer_challenge
from clusterlm.parallel.ps_wire import HEADER, JOIN, PUSH, message, pair_group

ATTEMPTS = {"pull": (JOIN, 0.0, 1.0), "nan-gradient": (PUSH, 0.1, float("nan")),
            "nan-lr": (PUSH, float("nan"), 1.0), "wrong-shape": (PUSH, 0.1, 1.0)}


def exchange(group: dist.ProcessGroup, kind: float, lr: float, payload: torch.Tensor | None, size: int) -> list:
    """One message as a worker sends it; the server's reply header, and whether values came back."""
    sends = [group.send([message(kind, lr, 0 if payload is None else payload.numel())], 0, 0)]
    if payload is not None:
        sends.append(group.send([payload], 0, 0))
    reply, values = torch.zeros(HEADER, dtype=torch.float64), torch.empty(size)
    group.recv([reply], 0, 0).wait()
    group.recv([values], 0, 0).wait()
    for work in sends:
        work.wait()
    return [*reply.tolist(), bool(values.isfinite().all())]


def outsider(store: dist.TCPStore, prefix: str, size: int) -> dict:
    forged = SignedStore(store, secrets.token_hex(32).encode(), prefix)
    plain = dist.PrefixStore(prefix.rstrip("/"), store)
    joins = {}
    for index, name in enumerate(ATTEMPTS):  # every join first, while the job runs
        number = store.add(f"{prefix}server0/joins", 1)
        (forged if index % 2 == 0 else plain).set(f"server0/join/{number}", "0")
        joins[name] = (number, forged if index % 2 == 0 else plain)
    report = {}
    for name, (number, via) in joins.items():
        kind, lr, fill = ATTEMPTS[name]
        try:
            key = f"server0/pair/{number}"
            group = pair_group(via, key, 1, 5.0)
            answer_challenge(group, forged.secret, key)
            payload = None if kind == JOIN else torch.full((size if name != "wrong-shape" else 3,), fill)
            report[name] = f"got {exchange(group, kind, lr, payload, size)}"
        except RuntimeError as exc:
            report[name] = f"failed: {str(exc).splitlines()[0][:160]}"
    return report


def insider(store: dist.TCPStore, prefix: str, size: int) -> dict:
    signed = SignedStore(store, job_secret(), prefix)
    number = signed.add("server0/joins", 1)
    signed.set(f"server0/join/{number}", "7")
    key = f"server0/pair/{number}"
    group = pair_group(signed, key, 1, 60.0)
    report: dict = {"proved": answer_challenge(group, signed.secret, key)}
    report["join"] = exchange(group, JOIN, 0.0, None, size)
    pushes = {"nan-gradient": (0.1, torch.full((size,), float("nan"))), "nan-lr": (float("nan"), torch.ones(size)),
              "negative-lr": (-1.0, torch.ones(size)), "short": (0.1, torch.ones(size // 2))}
    for name, (lr, payload) in pushes.items():
        report[name] = exchange(group, PUSH, lr, payload, size)
    try:
        report["oversize"] = exchange(group, PUSH, 0.1, torch.ones(size * 2), size)
    except RuntimeError as exc:
        report["oversize"] = f"closed: {str(exc).splitlines()[0][:160]}"
    return report


def main() -> None:
    mode, address, prefix, size, metrics = sys.argv[1:6]
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=120))
    while '"kind": "train"' not in (Path(metrics).read_text() if Path(metrics).is_file() else ""):
        time.sleep(0.05)  # until the job trains, every worker in
    report = (outsider if mode == "outsider" else insider)(store, prefix, int(size))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
