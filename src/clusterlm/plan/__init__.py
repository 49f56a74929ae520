"""The planner: memory, time and the fastest parallel layout for a model on a cluster.

    cluster = load_cluster("8xH100").with_nodes(4)
    work = Workload(load_model_args("llama-8b"), seq_len=8192, global_batch_tokens=4 * 2**20)
    best = search(work, cluster).ranked[0]          # a Candidate: layout, memory, time, MFU

Modules: ``cluster`` (devices and links), ``workload`` (model, batch, precision), ``layout`` (the
mesh and placement), ``memory`` (ZeRO + activations), ``collectives`` (alpha-beta costs),
``timing`` (step time), ``search``, ``emit`` (config TOML), ``validation`` (the layouts measured
on this machine and the comparison; ``clusterlm.bench.layout_runs`` measures them), ``fit`` (the
calibration fitted to them), ``published`` (published runs). Pure arithmetic: nothing here starts
a process; `clusterlm plan` is ``clusterlm.cli.plan``.
"""

from clusterlm.plan.calibration import Calibration, load_calibration
from clusterlm.plan.cluster import Cluster, Device, Link, load_cluster
from clusterlm.plan.layout import Layout, layout_problem
from clusterlm.plan.memory import MemoryBreakdown, device_memory
from clusterlm.plan.search import Candidate, SearchResult, evaluate, search
from clusterlm.plan.timing import StepTime, step_time
from clusterlm.plan.workload import Workload, load_model_args

__all__ = [
    "Calibration",
    "Candidate",
    "Cluster",
    "Device",
    "Layout",
    "Link",
    "MemoryBreakdown",
    "SearchResult",
    "StepTime",
    "Workload",
    "device_memory",
    "evaluate",
    "layout_problem",
    "load_calibration",
    "load_cluster",
    "load_model_args",
    "search",
    "step_time",
]
