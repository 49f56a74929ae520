"""Cluster descriptions, model loading, units and calibration files."""

import json

import pytest

from clusterlm.errors import UserError
from clusterlm.plan.calibration import Calibration, load_calibration, save_calibration
from clusterlm.plan.cluster import cluster_from_mapping, load_cluster, preset_names
from clusterlm.plan.units import parse_batch_tokens, parse_train_tokens
from clusterlm.plan.workload import load_model_args


def _tree(**changes):
    tree = {
        "name": "t",
        "nodes": 2,
        "devices_per_node": 8,
        "device": {"name": "gpu", "memory_gib": 80, "peak_tflops": {"bf16": 989}},
        "intra_node": {"bandwidth_gb_s": 450, "latency_us": 3},
        "inter_node": {"bandwidth_gb_s": 50, "latency_us": 10},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            tree[section] = {**tree[section], name: value}
        else:
            tree[section] = value
    return tree


@pytest.mark.parametrize("name", ["8xA100-80GB", "8xH100", "1xH100"])
def test_presets_load(name):
    cluster = load_cluster(name)
    assert cluster.device.peak_flops["bf16"] > 1e14 and cluster.device.memory_bytes == 80 * 2**30
    assert name in preset_names()


def test_cpu_is_probed():
    cluster = load_cluster("cpu")
    assert (
        cluster.world_size == 1
        and cluster.device.peak_flops["fp32"] > 0
        and cluster.device.memory_bytes > 2**28
    )


def test_valid_mapping_has_world_size_and_units():
    cluster = cluster_from_mapping(_tree(), "t.toml")
    assert (
        cluster.world_size == 16
        and cluster.inter_node.bandwidth == 50e9
        and cluster.intra_node.latency == 3e-6
    )


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"intra_node__bandwidth_gb_s": -1}, "[intra_node]: bandwidth_gb_s must be a number > 0"),
        ({"device__memory_gib": "lots"}, "[device]: memory_gib must be a number > 0"),
        ({"device__peak_tflops": {}}, "peak_tflops must be a table"),
        ({"nodes": 0}, "nodes must be a number >= 1"),
        ({"devices_per_node": 1.5}, "must be whole numbers"),
        ({"inter_node": None}, "missing [inter_node] table"),
        (
            {"calibration": {"compute_efficiency": 2}},
            "compute_efficiency must be a number in (0, 1]",
        ),
        ({"calibration": {"speed": 1}}, "unknown calibration key 'speed'"),
        ({"calibration": {"collective_wait": 1}}, "collective_wait must be a number in [0, 1)"),
    ],
)
def test_bad_cluster_values_name_the_key(changes, message):
    with pytest.raises(UserError) as err:
        cluster_from_mapping(_tree(**changes), "t.toml")
    assert message in str(err.value) and "t.toml" in str(err.value) and "\n" not in str(err.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("nodes = [")
    with pytest.raises(UserError, match="invalid TOML"):
        load_cluster(str(path))


def test_model_presets_derive_like_the_trainer():
    args = load_model_args("llama-8b")
    assert (args.n_layer, args.n_kv_head, args.ffn_hidden, args.vocab_size) == (
        32,
        8,
        14336,
        128256,
    )
    nano = load_model_args("nano-cpu", vocab_size=65)
    assert nano.ffn_hidden == 4 * 128 and nano.n_kv_head == 4


def test_units():
    assert parse_batch_tokens("4M") == 4 * 2**20 and parse_batch_tokens("2048") == 2048
    assert parse_train_tokens("15T") == 15e12 and parse_train_tokens("1.5k") == 1500
    with pytest.raises(UserError, match="must be positive"):
        parse_train_tokens("0")


def test_calibration_round_trip_and_errors(tmp_path):
    path = tmp_path / "cal.json"
    save_calibration(path, Calibration(compute_efficiency=0.3), {"device": "cpu"})
    assert json.loads(path.read_text())["device"] == "cpu"
    assert load_calibration(path).compute_efficiency == 0.3
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_calibration(path)
    with pytest.raises(UserError, match="not found"):
        load_calibration(tmp_path / "missing.json")
