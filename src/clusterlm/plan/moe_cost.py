"""A mixture of experts in the planner: where its parameters sit, what its blocks keep for
backward, what they compute, and expert parallelism's all-to-all.

Parameters (``rank_param_split``). An MoE block's attention and norms are split over tp like a
dense block's; its MLP (router, routed and shared experts) runs on the replicated residual stream,
whole on every tp rank, as the trainer runs it. The routed experts are split over the ``ep`` ranks
of ``Layout.ep`` (a factor of dp_shard), and ZeRO shards them further over the expert-data-parallel
group, the other dp_shard / ep ranks (``expert_shard_degree``); every other parameter over all of
dp_shard. Total parameters set the memory; active ones (the router, k routed and the shared
experts, ``clusterlm.models.counting``) the FLOPs.

Activations (``moe_mlp_activation_bytes``), per token of an MoE block, with e bytes per activation
element and r per residual element: the router's fp32 logits and scores (8*E) and its top-k
choice (int64 experts, fp32 weights, 12*k); per routed copy (k of them) the gathered input in the
compute dtype (e*h), the w1 and w3 outputs, the SiLU output and their product (4*e*hm), the
expert's output, kept for its weighting (e*h), the weighted output in the residual's dtype, kept
by the scatter back to the tokens (r*h), and the copy's int64 positions and fp32 weight (20); the
shared experts as one SwiGLU MLP of width S*hm (4*e*S*hm). None of it is split over tp.

All-to-all (``all_to_all_seconds``): with ep > 1 each MoE block sends each token's k copies to
their experts' ranks and back in forward, and their gradients the same way in backward: 4
all-to-alls of s*b*k*h elements per micro-batch (6 when full checkpointing reruns the forward),
the busiest rank receiving ``Workload.expert_imbalance`` times as many, none hidden behind
compute (each block waits for its tokens); before them, per block and forward, the token counts
go through one all-to-all of ``E`` integers. These are collectives
(``all_to_all_single``), priced by ``collectives.all_to_all``: their bytes over the link, plus the
link's measured all-to-all time where processes share cores.

Imbalance (``extra_moe_flops_per_token``): under expert parallelism every exchange waits for the
rank whose experts drew the most tokens, so a step runs at that rank's pace: its routed experts
compute ``Workload.expert_imbalance`` times the mean share.

Routing work (``routing_kernels``): the router's, the permutation's and the scatter's
element-wise and indexing kernels, in calls and bytes; the grouped and shared experts' multiplies
are FLOPs at the measured kernel rates, and their SwiGLU element-wise work is a dense MLP's.
"""

from __future__ import annotations

from clusterlm.models.counting import embedding_params, head_params, layer_params
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan import collectives
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.layout import Layout
from clusterlm.plan.stages import rank_share
from clusterlm.plan.workload import Workload


def expert_hidden(args: ModelArgs) -> int:
    return args.moe_ffn_hidden or args.ffn_hidden


def routed_params(args: ModelArgs) -> int:
    """The routed experts of one MoE block: E SwiGLU MLPs."""
    return args.moe_experts * 3 * args.n_embd * expert_hidden(args)


def moe_mlp_params(args: ModelArgs, active: bool = False) -> int:
    """One MoE block's MLP: router gate, routed and shared experts (with ``active``, the top k)."""
    routed = args.moe_top_k if active else args.moe_experts
    experts = (routed + args.moe_shared_experts) * 3 * args.n_embd * expert_hidden(args)
    return args.n_embd * args.moe_experts + experts


def moe_blocks_held(args: ModelArgs, blocks: tuple[int, ...]) -> int:
    """How many of ``blocks`` are MoE blocks."""
    moe = set(args.moe_blocks(args.n_layer))
    return sum(block in moe for block in blocks)


def most_moe_blocks(args: ModelArgs, layout: Layout) -> int:
    """The MoE blocks of the pipeline rank that holds the most."""
    return max(moe_blocks_held(args, rank_share(args, layout, r).blocks) for r in range(layout.pp))


def rank_param_split(work: Workload, layout: Layout, pp_rank: int) -> tuple[float, float]:
    """(every parameter but the routed experts, the routed experts) on one device of pipeline rank
    ``pp_rank``, before ZeRO (see the module docstring)."""
    args = work.model
    share = rank_share(args, layout, pp_rank)
    moe = set(args.moe_blocks(args.n_layer))
    whole = sum(layer_params(args, block in moe) for block in share.blocks)
    if share.embedding:
        whole += embedding_params(args)
    if share.head:
        whole += head_params(args)
        if not args.is_llama and layout.pp > 1:
            whole += args.vocab_size * args.n_embd  # the tied head needs its own copy
    n_moe = moe_blocks_held(args, share.blocks)
    mlp, routed = n_moe * moe_mlp_params(args), n_moe * routed_params(args)
    return (whole - mlp) / layout.tp + mlp - routed, routed / layout.ep


def expert_shard_degree(layout: Layout) -> int:
    """The ranks ZeRO shards the routed experts over: dp_shard's ranks outside the ep group."""
    return max(1, layout.dp_shard // layout.ep)


def moe_mlp_activation_bytes(args: ModelArgs, e: int, r: int) -> float:
    """Bytes an MoE block's MLP keeps per token (module docstring), e and r bytes per activation
    and residual element."""
    h, hm, k = args.n_embd, expert_hidden(args), args.moe_top_k
    routed = k * ((2 * e + r) * h + 4 * e * hm + 20)
    return 8 * args.moe_experts + 12 * k + routed + 4 * e * args.moe_shared_experts * hm


def mlp_params_on_device(args: ModelArgs, layout: Layout) -> float:
    """An MoE block's MLP on one device: whole on every tp rank, its routed experts 1/ep."""
    return moe_mlp_params(args) - routed_params(args) + routed_params(args) / layout.ep


def moe_block_params_on_device(args: ModelArgs, layout: Layout) -> float:
    """Parameters of an MoE block on one device, before ZeRO."""
    attention_and_norms = layer_params(args, moe=True) - moe_mlp_params(args)
    return attention_and_norms / layout.tp + mlp_params_on_device(args, layout)


def extra_moe_flops_per_token(work: Workload, layout: Layout, moe_blocks: int) -> float:
    """The training FLOPs per token of ``moe_blocks`` MoE blocks beyond the 1/tp share of the
    model FLOPs each rank already gets: the MoE MLPs run whole on every tp rank, and under expert
    parallelism the busiest rank runs ``expert_imbalance`` times its share of the routed tokens
    (without it every rank runs every expert on its own tokens: imbalance costs nothing)."""
    args = work.model
    replicated = 6.0 * moe_blocks * moe_mlp_params(args, active=True) * (1 - 1 / layout.tp)
    if layout.ep == 1:
        return replicated
    routed = args.moe_top_k * 3 * args.n_embd * expert_hidden(args)
    return replicated + 6.0 * moe_blocks * routed * (work.expert_imbalance - 1)


def rank_imbalance(tokens_per_expert: list[list[int]], ep: int) -> float:
    """``Workload.expert_imbalance`` from the trainer's routed tokens per expert of each MoE block
    (``moe_tokens_per_expert``; rank r of an ep group holds experts [r E/ep, (r+1) E/ep)): the
    busiest rank's tokens over the mean, averaged over the blocks, since each block's exchanges
    wait for its own busiest rank."""
    shares = []
    for loads in tokens_per_expert:
        held = len(loads) // ep
        per_rank = [sum(loads[r * held : (r + 1) * held]) for r in range(ep)]
        total = sum(per_rank)
        shares.append(max(per_rank) * ep / total if total else 1.0)
    return sum(shares) / len(shares) if shares else 1.0


def all_to_all_seconds(
    work: Workload, layout: Layout, cluster: Cluster, tokens: float, moe_blocks: int
) -> float:
    """Expert parallelism's all-to-alls of one micro-batch of ``tokens`` tokens per device over
    its ``moe_blocks`` MoE blocks (module docstring)."""
    if layout.ep == 1 or not moe_blocks:
        return 0.0
    args = work.model
    # The busiest rank receives ``expert_imbalance`` times the mean.
    routed_bytes = tokens * args.moe_top_k * args.n_embd * work.activation_bytes
    routed_bytes *= work.expert_imbalance
    group = collectives.mesh_group(layout, "ep", cluster)
    per_block = 6 if layout.activation_checkpointing == "full" else 4
    counts = (2 if layout.activation_checkpointing == "full" else 1) * collectives.all_to_all(
        args.moe_experts * 8, group, cluster
    )  # int64 counts, E / ep per destination
    return moe_blocks * (per_block * collectives.all_to_all(routed_bytes, group, cluster) + counts)


def routing_kernels(work: Workload, layout: Layout, tokens: float, r: int) -> tuple[float, float]:
    """(kernel calls, bytes touched) of one MoE block's routing (``clusterlm.models.moe.MoE`` and,
    with ep > 1, ``ExpertParallelExperts``) for ``tokens`` tokens, counted from the code with N
    tokens, E experts, k choices, width d, ``a`` bytes per activation and ``r`` per residual
    element, 4 per fp32 score and 8 per int64 index:

    - forward: the router's sigmoid or softmax, bias, top-k, gather and normalization (6 calls);
      the counts, the stable sort of the choices and their tokens, the gathered token rows and
      weights, the weighting, the zeroed output, the index_add back and the shared experts' sum
      (9); the balance loss (9) and the recorded loads (4): 28 calls over 36 N E + 116 N k +
      5 N k d a + 6 N d r bytes;
    - backward: the autograd nodes of those (scatter for the gather, index_put for the gathered
      rows and weights, the weighting's two products and sum, index_select for the index_add, the
      loss's, and the input gradient's three summed paths): 23 calls over 36 N E + 40 N k +
      7 N k d a + 10 N d r bytes;
    - with ep > 1, forward adds the counts' sums, the arrived tokens' expert order and its
      inverse, and the two gathers by them (10 calls, 48 N k + 4 N k d a, the tokens arriving
      as many as leave when the loads are even), backward their index_puts (4, 4 N k d a).

    Full checkpointing reruns the forward's."""
    args = work.model
    n, e, k, d = tokens, args.moe_experts, args.moe_top_k, args.n_embd
    a = work.activation_bytes
    forward = (28.0, 36 * n * e + 116 * n * k + 5 * n * k * d * a + 6 * n * d * r)
    backward = (23.0, 36 * n * e + 40 * n * k + 7 * n * k * d * a + 10 * n * d * r)
    if layout.ep > 1:
        forward = (forward[0] + 10, forward[1] + 48 * n * k + 4 * n * k * d * a)
        backward = (backward[0] + 4, backward[1] + 4 * n * k * d * a)
    reruns = 2 if layout.activation_checkpointing == "full" else 1
    return reruns * forward[0] + backward[0], reruns * forward[1] + backward[1]
