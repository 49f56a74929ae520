"""The job secret's checks on their own: signed store values, and the challenge that opens every
parameter-server connection, between two real processes (``helpers.run_distributed``)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.distributed import TCPStore

from clusterlm.distributed.job_secret import job_secret
from clusterlm.distributed.signing import SignedStore, UnsignedValue, answer_challenge, challenge
from clusterlm.errors import UserError

from .helpers import run_distributed

SECRET, OTHER = b"a" * 64, b"b" * 64


def test_only_values_signed_with_the_secret_under_their_own_key_are_read():
    base = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store, forger = SignedStore(base, SECRET, "job/"), SignedStore(base, OTHER, "job/")
    store.set("join/1", "0")
    assert store.get("join/1") == b"0" and b"0" in base.get("job/join/1")  # signed, not hidden
    forger.set("join/2", "0")
    base.set("job/join/3", "0")
    base.set("job/join/4", base.get("job/join/1"))  # a signed value moved to another key
    for key in ("join/2", "join/3", "join/4"):
        with pytest.raises(UnsignedValue, match="not signed with this job's CLUSTERLM_JOB_SECRET"):
            store.get(key)
    assert all(SECRET not in value and OTHER not in value for value in (base.get(f"job/join/{n}") for n in range(1, 5)))


def test_a_job_without_a_secret_is_one_clear_line():
    with pytest.raises(UserError, match="CLUSTERLM_JOB_SECRET is not set: .* `mpirun -x CLUSTERLM_JOB_SECRET"):
        job_secret({})
    with pytest.raises(UserError, match="shorter than 32 characters"):
        job_secret({"CLUSTERLM_JOB_SECRET": "short"})


def _meet(rank: int, world_size: int, secrets: list[bytes]) -> bool:
    """Rank 0 challenges as a server does, rank 1 answers with its own secret."""
    group = dist.distributed_c10d._get_default_group()
    if rank == 0:
        return challenge(group, secrets[0], "server0/pair/1")
    return answer_challenge(group, secrets[1], "server0/pair/1")


@pytest.mark.timeout(120)
def test_the_challenge_admits_a_holder_of_the_secret_and_no_one_else():
    assert run_distributed(_meet, 2, [SECRET, SECRET], timeout=60) == [True, True]
    # A peer without the secret is refused, and does not take the server's zeros for a proof.
    assert run_distributed(_meet, 2, [SECRET, OTHER], timeout=60) == [False, False]
