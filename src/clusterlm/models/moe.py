"""Mixture-of-experts feed-forward block (Shazeer et al. 2017; DeepSeek-V3, 2024), the llama
flavour's MLP in the blocks ``model.moe_layers`` names.

A router scores every token against ``E`` experts (softmax, or DeepSeek-V3's sigmoid), sends it to
its top ``k`` and sums their outputs weighted by the scores (optionally rescaled to sum to 1);
shared experts, one SwiGLU MLP as wide as all of them, see every token. Dropless: every token
reaches its experts, whatever their load. The experts are SwiGLU MLPs whose weights are stacked
``[E, ...]`` tensors, run as one grouped matrix multiply over the tokens sorted by expert.

Two ways to keep the experts' loads even (``model.moe_balance``):

- ``aux_loss``: Switch / GShard's load-balancing loss ``E * sum_i f_i * P_i`` (``f_i`` the share
  of routed tokens, ``P_i`` the mean normalized score of expert ``i``), which the objective adds
  to the language-model loss (``auxiliary_loss``);
- ``aux_free``: DeepSeek-V3's per-expert bias, added to the scores only to choose experts and
  moved after each optimizer step by ``rate * sign(mean load - load)`` (``update_router_biases``)
  from the tokens each expert received (``take_expert_stats``, which the caller sums over the
  data-parallel ranks first, so every rank applies the same update).

The model knows nothing of distribution: expert parallelism (``clusterlm.parallel.expert_parallel``)
shards the stacked weights on dimension 0 and sends ``GroupedExperts.forward``'s input, the tokens
sorted by expert, to their experts' ranks by all-to-all; the block hands its shared experts to the
routed ones, which run them while the tokens travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.config.experts import moe_layer_indices


@dataclass
class MoeArgs:
    """The mixture-of-experts hyper-parameters of a decoder (``model.moe_*``)."""

    moe_experts: int = 0  # routed experts per MoE block; 0 = a dense model
    moe_top_k: int = 2
    moe_shared_experts: int = 0
    moe_ffn_hidden: int = 0  # each expert's hidden width; 0 = the dense MLP's
    moe_layers: str = "all"
    moe_score: str = "sigmoid"
    moe_norm_topk: bool = True
    moe_balance: str = "aux_free"
    moe_aux_loss_coeff: float = 0.01
    moe_bias_rate: float = 1e-3

    def moe_blocks(self, n_layer: int) -> tuple[int, ...]:
        """Indices of the MoE blocks among ``n_layer`` (none in a dense model)."""
        return moe_layer_indices(self.moe_layers, n_layer) if self.moe_experts else ()


class Router(nn.Module):
    """Scores of each token for every expert, and its top-k experts with their weights."""

    expert_bias: torch.Tensor  # aux_free: added to the scores to choose experts, not to weigh them

    def __init__(self, dim: int, args: MoeArgs):
        super().__init__()
        self.gate = nn.Linear(dim, args.moe_experts, bias=False)
        self.top_k, self.score, self.norm_topk = args.moe_top_k, args.moe_score, args.moe_norm_topk
        self.register_buffer("expert_bias", torch.zeros(args.moe_experts))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """An unbalanced start: no expert favoured (the bias is trained state, checkpointed)."""
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k], experts [N, k], scores [N, E]), in fp32."""
        logits = self.gate(x).float()
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(-1)
        experts = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts, scores


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands here: eagerly on a CPU in fp32, bf16 or
    fp16 with rows of whole 16-byte units (compiled, its CPU form is not used), on a CUDA device of
    compute capability 9.0 or newer in bf16."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    aligned = all(size * a.element_size() % 16 == 0 for size in (*a.shape[1:], *b.shape[1:]))
    dtype_ok = a.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return a.device.type == "cpu" and aligned and dtype_ok and not torch.compiler.is_compiling()


def looped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The grouped multiply one expert at a time: rows of ``x`` in runs of ``counts``, run ``e``
    times ``w[e]`` (where the grouped kernel is missing)."""
    pieces = x.split(counts.tolist())
    return torch.cat([piece @ w[e] for e, piece in enumerate(pieces)])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x`` [M, a] (rows grouped by expert, ``counts`` per expert) times ``w`` [E, a, b]."""
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return looped_mm(x, w, counts)


class GroupedExperts(nn.Module):
    """``E`` SwiGLU MLPs, ``w2(silu(w1 x) * w3 x)``, with weights stacked on dimension 0."""

    residual_parameters = ("w2",)  # scaled at init like the dense MLP's output projection

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))

    def forward(
        self,
        tokens: torch.Tensor,
        counts: torch.Tensor,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` [M, d] sorted by expert, ``counts`` [E] of them per expert -> [M, d], and
        the result of ``alongside``: work that does not depend on the experts (the shared
        experts), which an implementation that moves the tokens runs while they travel."""
        out = swiglu_experts(tokens, counts, self.w1, self.w3, self.w2)
        return out, None if alongside is None else alongside()


def swiglu_experts(
    tokens: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The SwiGLU experts of stacked weights ``w1``, ``w3`` [E, d, h] and ``w2`` [E, h, d] on
    ``tokens`` [M, d] sorted by expert, ``counts`` [E] of them per expert -> [M, d]."""
    dtype = tokens.dtype
    if torch.is_autocast_enabled(tokens.device.type):  # torch does not autocast grouped mm
        dtype = torch.get_autocast_dtype(tokens.device.type)
    x, w1, w3, w2 = (t.to(dtype) for t in (tokens, w1, w3, w2))
    hidden = F.silu(grouped_mm(x, w1, counts)) * grouped_mm(x, w3, counts)
    return grouped_mm(hidden, w2, counts)


def _in_backward() -> bool:
    """Whether autograd's engine runs this code: a block recomputed for activation checkpointing,
    whose routing was already recorded when it first ran."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router, routed experts and shared experts (``shared``: an MLP that sees every token)."""

    def __init__(self, dim: int, hidden: int, args: MoeArgs, shared: nn.Module | None):
        super().__init__()
        self.router = Router(dim, args)
        self.experts = GroupedExperts(dim, hidden, args.moe_experts)
        self.shared = shared
        self.n_experts, self.top_k = args.moe_experts, args.moe_top_k
        self.balance, self.aux_loss_coeff = args.moe_balance, args.moe_aux_loss_coeff
        self.bias_rate = args.moe_bias_rate
        # Kept out of the buffers: every rank counts its own tokens, which DDP must not overwrite.
        self.aux_loss: torch.Tensor | None = None  # aux_loss: weighted, for the objective
        self.stats: torch.Tensor | None = None  # [tokens per expert..., aux loss sum, forwards]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        weights, experts, scores = self.router(flat)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)
        order = experts.flatten().argsort(stable=True)  # the (token, choice) pairs by expert
        token = order // self.top_k
        # The shared experts, given to the routed ones to run while their tokens travel.
        routed, shared = self.experts(
            flat[token], counts, None if self.shared is None else partial(self.shared, flat)
        )
        routed = routed * weights.flatten()[order, None]
        out = flat.new_zeros(flat.shape).index_add_(0, token, routed.to(flat.dtype))
        if shared is not None:
            out = out + shared
        if self.training and torch.is_grad_enabled():
            # Computed in a recompute too: activation checkpointing expects the same saved tensors.
            loss = balance_loss(counts, scores)
            if not _in_backward():
                self._record(counts, loss)
        return out.view_as(x)

    def _record(self, counts: torch.Tensor, loss: torch.Tensor) -> None:
        """Keep a training forward's loads and balance loss (for the objective, the bias update
        and the metrics)."""
        self.aux_loss = self.aux_loss_coeff * loss if self.balance == "aux_loss" else None
        step = torch.cat([counts.float(), loss.detach().view(1), loss.new_ones(1)])
        self.stats = step if self.stats is None else self.stats + step


def balance_loss(counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Switch's load-balancing loss ``E * sum_i f_i * P_i``: 1 when the loads are even."""
    share = counts.float() / counts.sum()  # f_i; no gradient flows through the choice
    probability = (scores / scores.sum(-1, keepdim=True)).mean(0)  # P_i
    return scores.size(-1) * (share * probability).sum()


def moe_blocks(model: nn.Module) -> list[MoE]:
    """The model's MoE blocks in forward order (the same order on every rank)."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted load-balancing losses of the last training forward (aux_loss balancing), for
    the objective to add to the language-model loss; taken, so each is added once."""
    losses = []
    for block in moe_blocks(model):
        if block.aux_loss is not None:
            losses.append(block.aux_loss)
            block.aux_loss = None
    return torch.stack(losses).sum() if losses else None


def take_expert_stats(model: nn.Module, device: torch.device) -> torch.Tensor:
    """[MoE blocks, E + 2]: per block the tokens each expert received, the summed balance loss and
    the number of training forwards since the last call; reset."""
    rows = []
    for block in moe_blocks(model):
        rows.append(
            block.stats
            if block.stats is not None
            else torch.zeros(block.n_experts + 2, device=device)
        )
        block.stats = None
    return torch.stack(rows)


@torch.no_grad()
def update_router_biases(model: nn.Module, loads: torch.Tensor) -> None:
    """aux_free balancing: move each expert's bias towards an even load, by the rate, from
    ``loads`` [MoE blocks, E] (the tokens per expert of the step, the same on every rank)."""
    for block, load in zip(moe_blocks(model), loads, strict=True):
        if block.balance == "aux_free":
            bias = block.router.expert_bias
            bias += block.bias_rate * torch.sign(load.mean() - load).to(bias)
