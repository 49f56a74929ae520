"""The planner's ep4 and ep1 step times for ``configs/moe-cpu.toml`` with a given number of
experts, on 4 local processes of this machine, to set beside what ``bench train`` measured
(benchmarks/moe-experts-ep4-cpu-xeon-2026-12-07.md).

``python benchmarks/ep_by_experts.py CALIBRATION.json IMBALANCE EXPERTS...``

The layouts are ``bench train``'s: 4 processes under zero2, 12 sequences of 64 tokens each, the
experts on every rank (ep1) or split over all four (ep4). The machine is described as
``plan --validate`` describes it (``clusterlm.bench.layout_runs``): one thread's kernel rates at
the case's shapes, the gloo link and exchange waits of 4 processes measured now, and the
calibration that ``plan --validate --calibration-out`` fitted. IMBALANCE is the busiest ep4
rank's routed tokens over the mean, as ``bench train`` reported it.
"""

from __future__ import annotations

import dataclasses
import sys

from clusterlm.bench.kernels import relative_kernel_rates
from clusterlm.bench.layout_runs import available_cores, local_cluster, local_link, one_thread_peaks
from clusterlm.plan.calibration import load_calibration
from clusterlm.plan.layout import Layout
from clusterlm.plan.timing import step_time
from clusterlm.plan.workload import Workload, load_model_args

PROCESSES, SEQUENCES, SEQ = 4, 12, 64


def main(calibration_path: str, imbalance: float, experts: list[int]) -> None:
    calibration = load_calibration(calibration_path)
    peaks, cores, link = one_thread_peaks(), available_cores(), local_link(PROCESSES)
    preset = load_model_args("moe-cpu", vocab_size=65)
    print("experts  ep1 ms  ep4 ms  ep4/ep1 tokens/s  ep4 all-to-all ms")
    for count in experts:
        args = dataclasses.replace(preset, moe_experts=count)
        times = {}
        for ep in (1, 4):
            work = Workload(
                args, SEQ, PROCESSES * SEQUENCES * SEQ, "fp32",
                expert_imbalance=imbalance if ep > 1 else 1.0,
            )  # fmt: skip
            layout = Layout(
                dp_shard=PROCESSES, data_parallel="zero2", ep=ep, micro_batch_size=SEQUENCES
            )
            rates = relative_kernel_rates(work, layout, peaks["fp32"])
            cluster = local_cluster(PROCESSES, peaks, link, cores, {"fp32": rates})
            cluster = dataclasses.replace(cluster, calibration=calibration)
            times[ep] = step_time(work, layout, cluster)
        ep1, ep4 = times[1].total * 1e3, times[4].total * 1e3
        print(
            f"{count:7d}  {ep1:6.1f}  {ep4:6.1f}  {ep1 / ep4:15.2f}x  "
            f"{times[4].expert_parallel * 1e3:17.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), [int(a) for a in sys.argv[3:]])
