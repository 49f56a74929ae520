"""Parameter-server all-reduce: every peer pushes to the servers, servers reduce and send back.

The flat buffer is cut into ``num_servers`` shards of (almost) equal size; the peer at position
s serves shard s. Every peer is a worker, the first ``num_servers`` peers are also servers. Each
server adds all n contributions to its shard at once (in float32 for half precision, so the sum
is rounded once), then returns the result to every worker. Two phases, each one batch of
point-to-point transfers; a server's links carry (n-1)/k of the buffer each way, which is why
more servers help.
"""

from __future__ import annotations

import torch

from clusterlm.comm.peers import Peers, accumulate, transfer


def parameter_server(buf: torch.Tensor, peers: Peers, *, num_servers: int = 1) -> None:
    """Sum ``buf`` (flat, contiguous) over ``peers`` in place; more servers than peers are
    clamped."""
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    n, me = peers.size, peers.index
    servers = min(num_servers, n)
    shards = torch.tensor_split(buf, servers)
    workers = [position for position in range(n) if position != me]
    serving = me < servers

    # Push: send each shard to its server; a server receives its shard from every other worker.
    contributions = buf.new_empty((len(workers), shards[me].numel())) if serving else None
    transfer(
        peers.group,
        sends=[(shards[s], peers.ranks[s]) for s in range(servers) if s != me],
        recvs=(
            [(row, peers.ranks[w]) for row, w in zip(contributions, workers, strict=True)]
            if contributions is not None
            else []
        ),
    )
    if contributions is not None:  # serving
        accumulate(shards[me], *contributions)

    # Pull: a server returns its reduced shard to every worker.
    transfer(
        peers.group,
        sends=[(shards[me], peers.ranks[w]) for w in workers] if serving else [],
        recvs=[(shards[s], peers.ranks[s]) for s in range(servers) if s != me],
    )
