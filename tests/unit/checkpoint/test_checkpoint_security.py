"""A checkpoint is data: crafted ones never run code and are refused in one line.

Each attack starts from a real checkpoint of a tiny model, tampers with it and seals it again
(complete.json recomputed), as an attacker who controls every file would. The payloads create a
marker file when they run; a control shows that each one does run where pickle is trusted.
"""

import io
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex

import clusterlm
from clusterlm import checkpoint
from clusterlm.cli import main as cli
from clusterlm.config import build_config
from clusterlm.errors import UserError
from clusterlm.files import sha256_file
from clusterlm.train.export_checkpoint import export_checkpoint_hf
from clusterlm.train.finetune import checkpoint_source
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import train

TINY = {
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 16,
    "model.block_size": 16,
    "training.micro_batch_size": 2,
    "training.eval_batches": 1,
    "training.log_interval": 1,
    "optim.warmup_steps": 1,
    "metrics.progress": "none",
    "metrics.tensorboard": False,
    "training.precision": "fp32",
    "training.steps": 2,
    "checkpoint.interval": 2,
}
EMBEDDING = "model.tok_embeddings.weight"


class Call:
    """Pickles as ``fn(*args)``: unpickling it calls ``fn``, itself possibly such a call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self):  # pickle wants the reduced callable to be callable
        raise AssertionError

    def __reduce__(self):
        return self.fn, self.args


def exec_payload(marker: Path) -> Call:
    """exec reached from DCP's own classes and builtins.getattr alone (what the old unpickler
    admitted): MetadataIndex.__init__.__globals__["__builtins__"]["exec"](code)."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    globals_get = Call(
        getattr, Call(getattr, Call(getattr, MetadataIndex, "__init__"), "__globals__"), "get"
    )
    builtins_get = Call(getattr, Call(globals_get, "__builtins__"), "get")
    return Call(Call(builtins_get, "exec"), code)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run with one complete checkpoint (its data directory beside it)."""
    root = tmp_path_factory.mktemp("secure")
    rng, words = random.Random(0), ["thou", "art", "the", "king", "of", "my", "heart"]
    lines = (" ".join(rng.choice(words) for _ in range(6)) for _ in range(600))
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    assert (
        cli(["prepare", str(root / "text.txt"), "--out", str(root / "prepared"), "--workers", "1"])
        == 0
    )
    train(config(root / "prepared", root / "run"))
    return root / "run"


def config(data_dir: Path, out_dir: Path, **overrides):
    return build_config(
        None, {**TINY, "data.dir": str(data_dir), "training.out_dir": str(out_dir), **overrides}
    )


@pytest.fixture
def attacked(run_dir, tmp_path):
    """A copy of the run whose checkpoint the test tampers with; the payload's marker must not
    appear."""
    ckpt = checkpoint.list_complete(shutil.copytree(run_dir, tmp_path / "run") / "checkpoints")[-1]
    yield ckpt, tmp_path / "payload-ran"
    assert not (tmp_path / "payload-ran").exists(), "the checkpoint ran code"


def seal(ckpt: Path) -> None:
    """complete.json recomputed over every file: the checksums pass, as the attacker's would."""
    sums = {
        p.name: sha256_file(p)
        for p in sorted(ckpt.iterdir())
        if p.is_file() and p.name != "complete.json"
    }
    (ckpt / "complete.json").write_text(json.dumps({"step": 2, "sha256": sums}))


def edit_index(ckpt: Path, change) -> None:  # change(the table of tensors), then seal
    index = json.loads((ckpt / "tensors.json").read_text())
    change(index["tensors"])
    (ckpt / "tensors.json").write_text(json.dumps(index))
    seal(ckpt)


def refused(ckpt: Path, match: str) -> str:
    """Loading for evaluation raises a one-line UserError matching ``match``; returns it."""
    with pytest.raises(UserError, match=match) as err:
        load_for_inference(checkpoint.Verified(ckpt, checkpoint.verify(ckpt)), device="cpu")
    assert "\n" not in str(err.value)
    return str(err.value)


def write_legacy(ckpt: Path, pickled: bytes) -> None:
    """The layout before tensors.json: DCP's pickled .metadata beside the tensors."""
    (ckpt / "tensors.json").unlink()
    (ckpt / ".metadata").write_bytes(pickled)
    seal(ckpt)


def test_a_checkpoint_loads_untampered(attacked):
    ckpt, _ = attacked
    seal(ckpt)
    assert (
        load_for_inference(checkpoint.Verified(ckpt, checkpoint.verify(ckpt)), device="cpu").step
        == 2
    )
    assert not (ckpt / ".metadata").exists()  # nothing pickled is written


def test_route_1_a_pickled_metadata_is_never_opened(attacked, tmp_path):
    ckpt, marker = attacked
    pickle.loads(
        pickle.dumps(exec_payload(tmp_path / "control"), protocol=4)
    )  # live where pickle is trusted
    assert (tmp_path / "control").read_text() == "ran"
    write_legacy(ckpt, pickle.dumps(exec_payload(marker), protocol=4))
    assert str(ckpt) in refused(ckpt, "predates clusterlm's pickle-free checkpoint format")


def test_route_1_a_pickled_metadata_beside_the_index_is_ignored(attacked):
    ckpt, marker = attacked
    (ckpt / ".metadata").write_bytes(pickle.dumps(exec_payload(marker), protocol=4))
    seal(ckpt)
    assert (
        load_for_inference(checkpoint.Verified(ckpt, checkpoint.verify(ckpt)), device="cpu").step
        == 2
    )


def legacy_bytes_checkpoint(ckpt: Path, marker: Path) -> None:
    """Genuine DCP classes only: the model's tensors as saved, but the token table saved as
    bytes, a torch.save'd payload (what clusterlm loaded before tensors.json)."""
    model = load_for_inference(
        checkpoint.Verified(ckpt, checkpoint.verify(ckpt)), device="cpu"
    ).model.parts[0]
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    state[EMBEDDING.removeprefix("model.")] = exec_payload(marker)
    for stale in ckpt.glob("*.distcp"):
        stale.unlink()
    with checkpoint.single_process_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's notice that it overwrites a checkpoint
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    (ckpt / "tensors.json").unlink()
    seal(ckpt)


def test_route_2_a_bytes_entry_in_dcp_metadata_is_never_read(attacked, tmp_path):
    ckpt, marker = attacked
    control = tmp_path / "control-run"
    shutil.copytree(ckpt, control)
    legacy_bytes_checkpoint(control, tmp_path / "control")
    with checkpoint.single_process_quiet():  # DCP's own reader runs it
        dcp.load(
            {"model": {"tok_embeddings.weight": torch.zeros(1)}},
            storage_reader=dcp.FileSystemReader(control),
            no_dist=True,
        )
    assert (tmp_path / "control").read_text() == "ran"
    legacy_bytes_checkpoint(ckpt, marker)
    assert not marker.exists()
    refused(ckpt, "predates")


def bytes_entry(ckpt: Path, marker: Path, kind: str = "bytes") -> None:
    """The new index declaring the token table a non-tensor stored as a torch.save'd payload."""
    buffer = io.BytesIO()
    torch.save(exec_payload(marker), buffer)
    (ckpt / "__1_0.distcp").write_bytes(buffer.getvalue())
    chunk = {
        "offsets": [0],
        "sizes": [1],
        "file": "__1_0.distcp",
        "offset": 0,
        "length": len(buffer.getvalue()),
    }
    edit_index(ckpt, lambda t: t.update({EMBEDDING: {"kind": kind, "chunks": [chunk]}}))


@pytest.mark.parametrize(
    "kind", ["bytes", "torch.distributed.checkpoint.metadata.BytesStorageMetadata"]
)
def test_route_2_a_bytes_entry_in_the_index_is_refused(attacked, kind):
    ckpt, marker = attacked
    bytes_entry(ckpt, marker, kind)
    refused(ckpt, f"entry {EMBEDDING} is of kind .*only tensors are loaded")


@pytest.mark.parametrize("loader", ["resume", "export", "finetune-init"])
def test_route_2_is_refused_by_every_loader(attacked, loader, tmp_path):
    ckpt, marker = attacked
    bytes_entry(ckpt, marker)
    found = checkpoint.Verified(ckpt, checkpoint.verify(ckpt))
    with pytest.raises(UserError, match="only tensors are loaded"):
        if loader == "resume":
            data_dir = Path(found.state["config"]["data"]["dir"])
            train(
                config(
                    data_dir,
                    tmp_path / "resumed",
                    **{"checkpoint.resume": str(ckpt), "training.steps": 4},
                )
            )
        elif loader == "export":
            export_checkpoint_hf(found, tmp_path / "hf", max_shard_bytes=1 << 20)
        else:
            checkpoint_source(ckpt)("tok_embeddings.weight", (17, 16), (slice(None),))


def eval_cli(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(clusterlm.__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "clusterlm", "eval", "--run", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("route", ["bytes entry", "legacy pickle"])
def test_the_cli_refuses_in_one_line(attacked, route):
    ckpt, marker = attacked
    if route == "bytes entry":
        bytes_entry(ckpt, marker)
    else:
        write_legacy(ckpt, pickle.dumps(exec_payload(marker), protocol=4))
    done = eval_cli(ckpt.parents[1])
    assert done.returncode != 0
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert ("only tensors are loaded" if route == "bytes entry" else "predates") in done.stderr


def first_chunk(tensors: dict) -> dict:
    return tensors[EMBEDDING]["chunks"][0]


VARIANTS = {
    "unknown field naming a class": (
        lambda t: t[EMBEDDING].update({"class": "os.system"}),
        "unexpected or missing fields: 'class'",
    ),
    "unknown dtype": (
        lambda t: t[EMBEDDING].update({"dtype": "object"}),
        "has dtype 'object', which is not one",
    ),
    "dtype named as a torch attribute": (
        lambda t: t[EMBEDDING].update({"dtype": "torch.float32"}),
        "has dtype 'torch.float32'",
    ),
    "path escaping the directory": (
        lambda t: first_chunk(t).update({"file": "../../secrets.distcp"}),
        "not a file name of the checkpoint",
    ),
    "absolute path": (
        lambda t: first_chunk(t).update({"file": "/etc/passwd"}),
        "not a file name of the checkpoint",
    ),
    "file that does not exist": (
        lambda t: first_chunk(t).update({"file": "__7_0.distcp"}),
        "not a file of the checkpoint",
    ),
    "negative offset": (lambda t: first_chunk(t).update({"offset": -8}), "not an integer in"),
    "overflowing offset": (lambda t: first_chunk(t).update({"offset": 2**64}), "not an integer in"),
    "overflowing length": (
        lambda t: first_chunk(t).update({"length": 2**63 + 1088}),
        "not an integer in",
    ),
    "float offset": (lambda t: first_chunk(t).update({"offset": 0.0}), "not an integer in"),
    "boolean offset": (lambda t: first_chunk(t).update({"offset": True}), "not an integer in"),
    "length unlike the chunk's": (
        lambda t: first_chunk(t).update({"length": 4}),
        "its shape needs 1088",
    ),
    "range past the end of the file": (
        lambda t: first_chunk(t).update({"offset": 10**9}),
        "reaches past the end of __0_0.distcp",
    ),
    "chunk outside its tensor": (
        lambda t: first_chunk(t).update({"offsets": [1, 0]}),
        "reaches past its size",
    ),
    "chunks that do not cover the tensor": (
        lambda t: t[EMBEDDING].update({"size": [18, 16]}),
        "do not add up to its size",
    ),
    "negative size": (lambda t: t[EMBEDDING].update({"size": [-17, 16]}), "not an integer in"),
    "too many dimensions": (
        lambda t: t[EMBEDDING].update({"size": [1] * 40}),
        "not a list of at most 8",
    ),
    "key with a newline": (
        lambda t: t.update({"model.x\nerror: forged": t[EMBEDDING]}),
        "which is not a state key",
    ),
    "missing entry the model needs": (
        lambda t: t.pop("model.norm.weight"),
        "has no model.norm.weight, which this model needs",
    ),
    "chunks sharing bytes": (
        lambda t: t.update({"model.norm.bias": t["model.norm.weight"]}),
        "two of its chunks share bytes",
    ),
    "dtype unlike the model's": (
        lambda t: t[EMBEDDING].update({"dtype": "int32"}),
        "holds model.tok_embeddings.weight as int32",
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_crafted_index_is_refused(attacked, name):
    ckpt, _ = attacked
    change, match = VARIANTS[name]
    edit_index(ckpt, change)
    refused(ckpt, match)


def own_bytes(ckpt: Path, sizes: list[int]) -> dict:
    """A chunk of ``sizes`` float32 zeros in a file of its own, as the attacker adds one."""
    (ckpt / "__1_0.distcp").write_bytes(bytes(4 * math.prod(sizes)))
    return {
        "offsets": [0] * len(sizes),
        "sizes": sizes,
        "file": "__1_0.distcp",
        "offset": 0,
        "length": 4 * math.prod(sizes),
    }


def test_a_shape_unlike_the_models_is_refused(attacked):
    """A consistent index (sizes, bytes, file) of a bigger token table than the model's."""
    ckpt, _ = attacked
    chunk = own_bytes(ckpt, [18, 16])
    edit_index(ckpt, lambda t: t[EMBEDDING].update({"size": [18, 16], "chunks": [chunk]}))
    refused(
        ckpt,
        r"holds model.tok_embeddings.weight as float32 \[18, 16\], "
        r"this model needs float32 \[17, 16\]",
    )


def test_an_extra_unexpected_key_is_refused(attacked):
    ckpt, _ = attacked
    entry = {"kind": "tensor", "dtype": "float32", "size": [4], "chunks": [own_bytes(ckpt, [4])]}
    edit_index(ckpt, lambda t: t.update({"model.extra.weight": entry}))
    refused(ckpt, "holds model.extra.weight, which this model does not have")


def test_a_symlinked_data_file_is_refused(attacked, tmp_path):
    ckpt, _ = attacked
    (tmp_path / "outside.bin").write_bytes(bytes(4096))
    (ckpt / "__1_0.distcp").symlink_to(tmp_path / "outside.bin")
    edit_index(ckpt, lambda t: first_chunk(t).update({"file": "__1_0.distcp"}))
    refused(ckpt, "__1_0.distcp, which is not a file of the checkpoint")


@pytest.mark.parametrize(
    "name,damage,match",
    [
        ("tensors.json", lambda data: data[: len(data) // 2], "unreadable tensors.json"),
        ("tensors.json", lambda data: b"[" * 100_000, "unreadable tensors.json"),
        ("tensors.json", lambda data: b"[]", "the index is not a JSON object"),
        ("tensors.json", lambda data: data.replace(b"tensors/1", b"tensors/9"), "has format"),
        ("tensors.json", lambda data: data.replace(b'"little"', b'"big"'), "'big'-endian"),
        ("tensors.json", None, "has no tensors.json; it is damaged or not a clusterlm checkpoint"),
        ("__0_0.distcp", lambda data: data[:100], "reaches past the end of __0_0.distcp"),
    ],
)
def test_a_damaged_or_missing_file_is_refused(attacked, name, damage, match):
    ckpt, _ = attacked
    if damage is None:
        (ckpt / name).unlink()
    else:
        (ckpt / name).write_bytes(damage((ckpt / name).read_bytes()))
    seal(ckpt)
    refused(ckpt, match)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "..", "sub/file"])
def test_complete_json_names_only_files_of_the_checkpoint(attacked, name):
    ckpt, _ = attacked
    sums = json.loads((ckpt / "complete.json").read_text())
    (ckpt / "complete.json").write_text(
        json.dumps({**sums, "sha256": {**sums["sha256"], name: "0" * 64}})
    )
    with pytest.raises(UserError, match="which is not a file name"):
        checkpoint.verify(ckpt)


def test_only_tensors_are_saved(tmp_path):
    """Non-tensor state (RNG, loader position, schedule) belongs in trainer.json, never pickled."""
    state = {"model": {"w": torch.ones(2)}, "rng": {"seed": 3}}
    with pytest.raises(CheckpointException, match="rng.seed is not a tensor"):
        checkpoint.save_checkpoint(tmp_path, 1, state, {"step": 1}, keep_last=1)
    assert not list(tmp_path.rglob(".metadata"))


def test_every_saved_dtype_reads_back_exactly(tmp_path):
    saved = {
        "model": {
            "f32": torch.randn(3, 5),
            "bf16": torch.randn(4, 2).to(torch.bfloat16),
            "f16": torch.randn(7).half(),
            "f64": torch.randn(2, 2, 2, dtype=torch.float64),
            "i64": torch.arange(-5, 5),
            "u8": torch.arange(9, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "strided": torch.arange(20.0).reshape(4, 5).t(),
        }
    }
    path = checkpoint.save_checkpoint(tmp_path, 1, saved, {"step": 1}, keep_last=1)
    checkpoint.verify(path)
    loaded = {"model": {name: torch.full_like(value, 7) for name, value in saved["model"].items()}}
    checkpoint.CheckpointReader(path).read(loaded)
    for name, value in saved["model"].items():
        assert torch.equal(loaded["model"][name], value), name
    assert torch.equal(
        checkpoint.CheckpointReader(path).model_tensor("bf16"), saved["model"]["bf16"]
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "__0_0.distcp",
        "complete.json",
        "tensors.json",
        "trainer.json",
    ]
