"""Training a translation model on a translation task (``data.dir`` prepared by
`clusterlm prepare --task translation:...`): the task it trains on, and how it is scored.

The model is the encoder–decoder (``model.flavour = mbart``), or a decoder-only one (gpt2, llama)
trained on the sequences ``source <eot> target <eot>`` and translating by continuing the prompt
``source <eot>``: the comparison of the two at equal training FLOPs is the point. Teacher-forced
cross-entropy on the target tokens, padding left out (``clusterlm.data.pair_batches``); training
batches hold pairs of similar length and are trimmed to their longest, through the trainer's
data-parallel layouts. Each evaluation scores a split's
pairs (the periodic one ``training.eval_batches`` global batches of them, evenly spaced; the final
test every pair): loss and accuracy per target token, and BLEU and chrF (sacrebleu, BLEU's 13a
tokenization) of greedy translations against the references.
"""

from __future__ import annotations

from functools import partial

import sacrebleu
import torch
import torch.distributed as dist
from torch import nn

from clusterlm.config import Config
from clusterlm.data.classification import evaluation_batches
from clusterlm.data.loader import TokenLoader
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.pair_batches import JoinedPairStream, PairStream, prompt_lengths
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import (
    SOURCE_TOKENIZER_NAME,
    PairSplit,
    TranslationManifest,
    load_translation,
)
from clusterlm.distributed.runtime import Runtime
from clusterlm.errors import UserError
from clusterlm.models import ModelArgs, training_flops_per_token
from clusterlm.models.gpt import attention_kernel
from clusterlm.models.init import ParamSource
from clusterlm.models.seq2seq import SEQ2SEQ_FLAVOUR
from clusterlm.parallel import ParallelModel
from clusterlm.parallel.model import WholeModel
from clusterlm.train.decoding import GREEDY, Search
from clusterlm.train.evaluate import eval_windows
from clusterlm.train.optim import optimizer_recipe
from clusterlm.train.pretrained_weights import check_pretrained_tokenizer, pretrained_source
from clusterlm.train.session import Metrics, Session, TaskSpec, build_model, read_tokenizer
from clusterlm.train.translate import TRANSLATION_STATE, target_text, translation_state

DECODER_ONLY_FLAVOURS = ("gpt2", "llama")
SORTED_POOL_BATCHES = 50  # a training pool sorted by length: this many micro-batches of pairs


def pair_stream(
    cfg: Config, split: PairSplit, manifest: TranslationManifest, training: bool = False
) -> PairStream:
    """A split's pairs in the layout of ``model.flavour``; for training, sorted by length within
    pools and trimmed per batch."""
    layout = PairStream if is_seq2seq_flavour(cfg) else JoinedPairStream
    if not training:
        return layout(split, manifest.eot_id, manifest.target_offset)
    pool = SORTED_POOL_BATCHES * cfg.training.micro_batch_size
    return layout(split, manifest.eot_id, manifest.target_offset, trim=True, pool=pool)


def is_seq2seq_flavour(cfg: Config) -> bool:
    return cfg.model.flavour == SEQ2SEQ_FLAVOUR


def _check_flavour(cfg: Config) -> None:
    if cfg.model.flavour not in (SEQ2SEQ_FLAVOUR, *DECODER_ONLY_FLAVOURS):
        raise UserError(
            f"{cfg.data.dir} is a translation task, which model.flavour = {cfg.model.flavour} "
            f"cannot learn: train it with model.flavour = {SEQ2SEQ_FLAVOUR} (the "
            f"encoder-decoder) or a decoder-only {' or '.join(DECODER_ONLY_FLAVOURS)}"
        )
    p = cfg.parallel
    if not is_seq2seq_flavour(cfg) and (p.pp > 1 or p.tp > 1 or p.cp > 1):
        raise UserError(
            "a decoder-only model learns a translation task on data-parallel layouts only for "
            "now; use parallel.pp = 1, parallel.tp = 1 and parallel.cp = 1"
        )
    if not is_seq2seq_flavour(cfg) and cfg.training.objective != "clm":
        raise UserError(
            f"a decoder-only model learns a translation task with training.objective = clm, "
            f"not {cfg.training.objective}; set training.objective = clm"
        )


def translation_task(cfg: Config) -> TaskSpec:
    """The translation model trained on the pairs of the translation task in ``data.dir``."""
    task = load_translation(cfg.data.dir, verify=cfg.data.verify)
    _check_flavour(cfg)
    manifest = task.manifest
    streams = {name: pair_stream(cfg, split, manifest) for name, split in task.splits.items()}
    train = pair_stream(cfg, task.splits["train"], manifest, training=True)
    tokenizer = read_tokenizer(cfg.data.dir, manifest.tokenizer.sha256)
    decoder = Tokenizer(tokenizer.payload.decode("utf-8"))
    source = manifest.source_tokenizer
    saved_files = {}
    if source is not None:
        saved = read_tokenizer(cfg.data.dir, source.sha256, source.file)
        saved_files[SOURCE_TOKENIZER_NAME] = saved.payload

    check_pretrained_tokenizer(cfg, manifest)

    def model(settled: Config) -> tuple[nn.Module, ParamSource]:
        plain, seeded = build_model(settled, manifest.vocab_size)
        return plain, pretrained_source(settled) or seeded  # model.init_from = hf:DIR

    def evaluate(session: Session, split: str) -> Metrics:
        final = split in session.task.final_splits
        limit = None if final else eval_windows(session.cfg, session.runtime.dp_size)
        return translation_metrics(
            session.model, session.cfg, session.runtime, streams[split], decoder, limit
        )

    return TaskSpec(
        vocab_size=manifest.vocab_size,
        tokenizer=tokenizer,
        stream=train,
        model=model,
        flops_per_token=lambda args, settled: training_flops_per_token(args, settled.seq_len),
        recipe=lambda part, settled: optimizer_recipe(part, settled.optim),
        evaluate=evaluate,
        final_splits=("test",),
        saved_files=saved_files,
        saved_state={TRANSLATION_STATE: translation_state(manifest)},
        step_work=partial(trimmed_step_work, train),
    )


def trimmed_step_work(
    stream: PairStream, args: ModelArgs, cfg: Config, loader: TokenLoader
) -> tuple[int, float]:
    """The positions the loader's next step computes over every rank, each micro-batch trimmed
    to its longest pair (target positions, a source position of the same length counted with
    each), and their training FLOPs at that length: the same on every rank, from the sample
    order alone, so tokens/s and MFU count what is computed rather than ``seq_len`` per pair."""
    size, first = loader.micro_batch_size, loader.samples_consumed
    lengths = [
        stream.batch_length([loader.window_of(i) for i in range(start, start + size)], cfg.seq_len)
        for start in range(first, first + loader.global_batch_size, size)
    ]
    flops = sum(length * training_flops_per_token(args, length) for length in lengths)
    return size * sum(lengths), size * flops


def evaluate_translation(
    model: ParallelModel,
    cfg: Config,
    runtime: Runtime,
    split: str,
    limit: int | None,
    search: Search,
) -> tuple[Metrics, list[str]]:
    """`clusterlm eval` of a run trained on the translation task in ``data.dir``: the scores, and
    each scored pair's translation in the split's order."""
    task = load_translation(cfg.data.dir, verify=cfg.data.verify)
    stream = pair_stream(cfg, task.splits[split], task.manifest)
    tokenizer = Tokenizer.load(f"{cfg.data.dir.rstrip('/')}/tokenizer.json")
    return scored_translations(model, cfg, runtime, stream, tokenizer, limit, search)


def translation_metrics(
    model: ParallelModel,
    cfg: Config,
    runtime: Runtime,
    stream: PairStream,
    tokenizer: Tokenizer,
    limit: int | None,
    search: Search = GREEDY,
) -> Metrics:
    """Loss and accuracy per target token, BLEU and chrF of translations (greedy, or by beam
    ``search``), over the split's pairs (every one, or ``limit`` evenly spaced ones)."""
    return scored_translations(model, cfg, runtime, stream, tokenizer, limit, search)[0]


def scored_translations(
    model: ParallelModel,
    cfg: Config,
    runtime: Runtime,
    stream: PairStream,
    tokenizer: Tokenizer,
    limit: int | None,
    search: Search = GREEDY,
) -> tuple[Metrics, list[str]]:
    """``translation_metrics``, and the translations scored. Each data-parallel rank translates a
    contiguous share and the shares are gathered, so every rank reports the same scores."""
    assert isinstance(model, WholeModel)  # a translation model runs no pipeline
    lockstep = runtime.world_size > 1 and runtime.lockstep
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime.lockstep else (0, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # loss, right, targets
    hypotheses, references = [], []
    was_training = model.parts[0].training
    model.parts[0].eval()
    batches = evaluation_batches(
        stream, cfg.seq_len, cfg.training.micro_batch_size, dp_rank, dp_size, runtime.device, limit
    )
    for x, y in batches:
        with attention_kernel(cfg.training.attention):
            sums[:2] += model.eval_sums(x, y).double()
            with model.precision.autocast():
                hypotheses.append(_translations(model, cfg, x, y, stream.eot_id, search, lockstep))
        references.append(y)
        sums[2] += (y != IGNORE_INDEX).sum()
    model.parts[0].train(was_training)
    hyp, ref = torch.cat(hypotheses), torch.cat(references)
    if lockstep:
        dist.all_reduce(sums)
        hyp, ref = _gathered(hyp, runtime.tp_size), _gathered(ref, runtime.tp_size)
    real = (ref != IGNORE_INDEX).any(1)  # filler rows out
    texts = [target_text(tokenizer, row, stream.eot_id, stream.target_offset) for row in hyp[real]]
    truth = [target_text(tokenizer, row, stream.eot_id, stream.target_offset) for row in ref[real]]
    count = float(sums[2].clamp(min=1))
    scores: Metrics = {
        "loss": float(sums[0]) / count,
        "accuracy": float(sums[1]) / count,
        "bleu": sacrebleu.corpus_bleu(texts, [truth]).score,
        "chrf": sacrebleu.corpus_chrf(texts, [truth]).score,
    }
    return scores, texts


def _translations(
    model: WholeModel,
    cfg: Config,
    x: torch.Tensor,
    y: torch.Tensor,
    eot_id: int,
    search: Search,
    lockstep: bool,
) -> torch.Tensor:
    """The translations [B, T] of a batch's sources: the encoder–decoder's of each row's source
    half; a decoder-only model's continuations of its prompts ``source <eot>``."""
    all_done = _agreed if lockstep else lambda done: done
    if is_seq2seq_flavour(cfg):
        return search.decode(model.parts[0], x[:, : cfg.seq_len], eot_id, cfg.seq_len, all_done)
    lengths = prompt_lengths(y)
    prompts = x[:, : int(lengths.max())]
    half = cfg.seq_len // 2
    return search.continue_prompts(model.parts[0], prompts, lengths, eot_id, half, all_done)


def _agreed(done: bool) -> bool:
    """Whether every rank's batch has finished (so all stop at the same step)."""
    flag = torch.tensor([float(done)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gathered(rows: torch.Tensor, tp: int) -> torch.Tensor:
    """Every data-parallel rank's rows, in rank order (the shares are of equal size). The ranks
    of a tensor-parallel group hold the same rows; tp is the mesh's innermost dimension, so every
    ``tp``-th rank's are a new share."""
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts[::tp])
