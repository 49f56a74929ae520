"""Greedy decoding and beam search of the encoder–decoder, batched: the encoder runs once per batch
and the decoder feeds one new token per step, reusing its cached keys and values
(``clusterlm.models.seq2seq.DecodingCache``). The beam search itself (``beam_search``) takes any
model's step, and serves decoder-only generation too (``clusterlm.train.generate``, and
translation by continuing prompts of different lengths, ``CachedPrompts``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clusterlm.data.special_tokens import PAD
from clusterlm.models.gpt import Attention
from clusterlm.models.seq2seq import DecodingCache
from clusterlm.parallel.tensor_parallel import full_value


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    source: torch.Tensor,
    eot_id: int,
    max_len: int,
    all_done: Callable[[bool], bool] = lambda done: done,
) -> torch.Tensor:
    """The most likely next token, step by step, for each source row [B, S] (PAD-padded): the
    tokens [B, max_len] up to and without the end-of-text token, PAD after it. ``model`` is the
    encoder–decoder, or a data-parallel wrapper of it (its forward takes the cache). Decoding
    stops when ``all_done(every row of this batch ended)`` says so: under sharded data parallelism
    every rank must run the same number of forward passes, so it asks the other ranks."""
    batch = source.size(0)
    cache = DecodingCache(source)
    tokens = torch.full((batch, 1), eot_id, dtype=torch.long, device=source.device)
    out = torch.full((batch, max_len), PAD, dtype=torch.long, device=source.device)
    done = torch.zeros(batch, dtype=torch.bool, device=source.device)
    for step in range(max_len):
        tokens = _next_logits(model, tokens, cache).argmax(-1, keepdim=True)
        done |= tokens[:, 0] == eot_id
        out[:, step] = tokens[:, 0].masked_fill(done, PAD)
        if all_done(bool(done.all())):
            break
    return out


def _next_logits(model: nn.Module, tokens: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
    """The logits [B, V] of each row's next token, whole on every rank (tensor parallelism
    splits them on the vocabulary)."""
    return full_value(model(tokens, cache=cache)[:, -1])


Finished = list[list[tuple[float, list[int]]]]  # per row: (normalized score, tokens)


def beam_decode(
    model: nn.Module,
    source: torch.Tensor,
    eot_id: int,
    max_len: int,
    beam: int,
    length_penalty: float = 1.0,
    all_done: Callable[[bool], bool] = lambda done: done,
) -> torch.Tensor:
    """Beam search of the encoder–decoder, batched (``beam_search``), its encoder's output and
    keys and values cached and reordered with the beams; returns what ``greedy_decode`` does."""
    cache = DecodingCache(source.repeat_interleave(beam, 0))
    first = torch.full((cache.source.size(0), 1), eot_id, dtype=torch.long, device=source.device)
    return beam_search(
        lambda tokens: _next_logits(model, tokens, cache),
        cache.reorder,
        first,
        eot_id,
        max_len,
        beam,
        length_penalty,
        all_done,
    )


@torch.no_grad()
def beam_search(
    step: Callable[[torch.Tensor], torch.Tensor],
    reorder: Callable[[torch.Tensor], None],
    first: torch.Tensor,
    eot_id: int,
    max_len: int,
    beam: int,
    length_penalty: float = 1.0,
    all_done: Callable[[bool], bool] = lambda done: done,
) -> torch.Tensor:
    """Beam search, batched, of any model: ``step(tokens)`` feeds each hypothesis its newest tokens
    (``first`` [B * beam, t] at the start, then one) and returns its next-token logits
    [B * beam, V]; ``reorder(rows)`` keeps the model's state of hypotheses ``rows``. Returns the
    tokens [B, max_len] up to and without the end-of-text token, PAD after it.

    It is Hugging Face's ``generate(num_beams=beam, length_penalty=..., early_stopping=True,
    max_new_tokens=max_len)``, step for step: each row keeps ``beam`` live hypotheses, and ranks
    the ``2 * beam`` best extensions of them all. Of the first ``beam`` of those, each that ends
    (and, at the last step, every one) is finished, scored by its log-probability / its length
    (the end-of-text token counted) ** ``length_penalty``; a row keeps its ``beam`` best finished
    ones and stops once it has ``beam``. The first ``beam`` extensions that do not end stay live.
    The best scored finished hypothesis is the result. ``all_done`` as in ``greedy_decode``."""
    batch, device = first.size(0) // beam, first.device
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one hypothesis to start from: the others are its copies
    history = torch.empty(batch * beam, 0, dtype=torch.long, device=device)
    tokens = first
    finished: Finished = [[] for _ in range(batch)]
    for position in range(max_len):
        logp = step(tokens).float().log_softmax(-1)
        candidates = scores[:, :, None] + logp.view(batch, beam, -1)
        last = position == max_len - 1
        penalized = (position + 1) ** length_penalty
        keep, tokens, scores = _advance(candidates, history, finished, eot_id, penalized, last)
        history = torch.cat([history[keep], tokens], 1)
        if all_done(all(len(f) >= beam for f in finished)) or last:
            break
        reorder(keep)
    out = torch.full((batch, max_len), PAD, dtype=torch.long, device=device)
    for row, hypotheses in enumerate(finished):
        best = max(hypotheses, key=lambda h: h[0])[1] if hypotheses else []
        out[row, : len(best)] = torch.tensor(best, dtype=torch.long)
    return out


def _advance(
    candidates: torch.Tensor,
    history: torch.Tensor,
    finished: Finished,
    eot_id: int,
    length: float,
    last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of every row: from ``candidates`` [B, beam, V] (each live hypothesis' score plus
    each next token's log-probability), the hypotheses that end join ``finished`` (scored / the
    penalized ``length``) and the best others stay live. Returns which hypothesis each live slot
    extends, its token and its score (a row already done, or short of candidates, keeps empty
    slots of score -inf)."""
    batch, beam, vocab = candidates.shape
    keep = torch.arange(batch * beam, device=candidates.device)
    # an empty slot (score -inf) feeds token 0 on: any id the model embeds
    tokens = torch.zeros((batch, beam), dtype=torch.long, device=candidates.device)
    scores = torch.full((batch, beam), float("-inf"), device=candidates.device)
    values, indices = candidates.view(batch, -1).topk(min(2 * beam, beam * vocab), dim=1)
    for row in range(batch):
        if len(finished[row]) >= beam:
            continue  # done: its finished hypotheses are final
        live, ended = 0, []
        for rank, (value, index) in enumerate(
            zip(values[row].tolist(), indices[row].tolist(), strict=True)
        ):
            if value == float("-inf"):
                break
            origin, token = divmod(index, vocab)
            if (token == eot_id or last) and rank < beam:
                sequence = history[row * beam + origin].tolist()
                ended.append((value / length, sequence + ([] if token == eot_id else [token])))
            if token != eot_id and live < beam:
                keep[row * beam + live] = row * beam + origin
                tokens[row, live], scores[row, live] = token, value
                live += 1
        finished[row] = sorted(finished[row] + ended, key=lambda h: -h[0])[:beam]
    return keep, tokens.view(-1, 1), scores


class CachedPrompts:
    """A decoder-only model's step over prompts of different lengths, for ``beam_search``, with
    each layer's keys and values cached: the prompts are right-aligned (left-padded), each token
    at its own position, and padding masked; then every step feeds each row's newest token.

    The cache needs nothing of the model but its attention's ``attend`` hook (the one context
    parallelism swaps): while stepping, each ``Attention``'s attend sees the keys and values of
    the earlier steps before its own."""

    def __init__(self, model: nn.Module, prompts: torch.Tensor, lengths: torch.Tensor) -> None:
        width = prompts.size(1)
        columns = torch.arange(width, device=prompts.device)
        pad = width - lengths
        self.model = model
        self.valid = columns[None, :] >= pad[:, None]  # [N, K]: keys that are tokens
        self.positions = (columns[None, :] - pad[:, None]).clamp(min=0)
        self.prompts = torch.where(self.valid, prompts.gather(1, self.positions), 0)
        self.next = lengths.clone()  # the position of each row's next token
        self.cache: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.started = False

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [N, V]; ``tokens``: the prompts at the first step (the aligned ones
        are fed), then each row's newest token [N, 1]."""
        if not self.started:
            width = self.valid.size(1)
            causal = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril()
            itself = torch.eye(width, dtype=torch.bool, device=tokens.device)
            # a padding slot attends to itself only: no row of its scores is all masked
            mask = causal[None] & self.valid[:, None, :] | itself[None]
            tokens, positions, self.started = self.prompts, self.positions, True
        else:
            self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], 1)
            mask, positions = self.valid[:, None, :], self.next[:, None]
            self.next = self.next + 1
        hooked = [m for m in self.model.modules() if isinstance(m, Attention)]
        originals = [m.attend for m in hooked]
        try:
            for module, attend in zip(hooked, originals, strict=True):
                module.attend = functools.partial(self._attend, module, attend)
            return self.model(tokens, positions, mask[:, None])[:, -1]
        finally:
            for module, attend in zip(hooked, originals, strict=True):
                module.attend = attend

    def _attend(
        self, module: nn.Module, attend: Callable[..., torch.Tensor], q: torch.Tensor,
        k: torch.Tensor, v: torch.Tensor, *rest: Any,
    ) -> torch.Tensor:  # fmt: skip
        if module in self.cache:
            k = torch.cat([self.cache[module][0], k], 2)
            v = torch.cat([self.cache[module][1], v], 2)
        self.cache[module] = (k, v)
        return attend(q, k, v, *rest)

    def reorder(self, rows: torch.Tensor) -> None:
        self.valid, self.next = self.valid[rows], self.next[rows]
        self.cache = {m: (k[rows], v[rows]) for m, (k, v) in self.cache.items()}


@dataclass(frozen=True)
class Search:
    """How translations are decoded: greedy (a beam of 1) or beam search."""

    beam: int = 1
    length_penalty: float = 1.0

    def decode(
        self,
        model: nn.Module,
        source: torch.Tensor,
        eot_id: int,
        max_len: int,
        all_done: Callable[[bool], bool],
    ) -> torch.Tensor:
        if self.beam == 1:
            return greedy_decode(model, source, eot_id, max_len, all_done)
        return beam_decode(model, source, eot_id, max_len, self.beam, self.length_penalty, all_done)

    def continue_prompts(
        self,
        model: nn.Module,
        prompts: torch.Tensor,
        lengths: torch.Tensor,
        eot_id: int,
        max_len: int,
        all_done: Callable[[bool], bool],
    ) -> torch.Tensor:
        """A decoder-only model's continuations of ``prompts`` [B, P] (row r's first
        ``lengths[r]`` tokens), as ``decode`` returns them: beam search (a beam of 1 is greedy:
        it keeps the most likely token, and ends when that is the end-of-text token)."""
        rows = CachedPrompts(
            model, prompts.repeat_interleave(self.beam, 0), lengths.repeat_interleave(self.beam)
        )
        return beam_search(
            rows.step,
            rows.reorder,
            rows.prompts,
            eot_id,
            max_len,
            self.beam,
            self.length_penalty,
            all_done,
        )


GREEDY = Search()
