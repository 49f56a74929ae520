"""The communication benchmark end to end: spawns its own processes, prints, writes JSON and PNG;
and the link `plan --validate` measures with the same sweep."""

from __future__ import annotations

import json
import math

from clusterlm.bench.collective_sweep import measure_link
from clusterlm.cli.bench_comm import main
from clusterlm.plan.cluster import Link


def test_bench_prints_table_and_fits_and_writes_json_and_plot(tmp_path, capsys):
    report, figure = tmp_path / "comm.json", tmp_path / "comm.png"
    argv = ["--nproc", "2", "--algorithms", "ring,tree", "--sizes", "16K..256K", "--iters", "2", "--warmup", "1"]
    assert main([*argv, "--json", str(report), "--plot", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "busbw (GB/s)" in printed and "spread" in printed and "1/beta (GB/s)" in printed
    data = json.loads(report.read_text())
    assert data["world_size"] == 2
    assert {(m["algorithm"], m["bytes"]) for m in data["measurements"]} == {
        (a, s) for a in ("ring", "tree") for s in (16 << 10, 64 << 10, 256 << 10)
    }
    assert all(m["time_us"] > 0 and m["busbw_gbps"] == m["algbw_gbps"] and m["spread"] >= 0 for m in data["measurements"])
    assert [f["algorithm"] for f in data["fits"]] == ["ring", "tree"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_link_reads_the_all_reduce_sweep_as_a_ring():
    link = measure_link(2, iters=2)
    assert isinstance(link, Link)
    assert 0 < link.bandwidth < math.inf and 0 <= link.latency < 1
