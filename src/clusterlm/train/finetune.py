"""Fine-tuning a pretrained model on a labelled task (`clusterlm finetune`): the session it trains.

The model is the pretrained backbone with a classification head (``clusterlm.models.classifier``),
built on the meta device and materialized per shard like any model: backbone tensors come from
the pretrained checkpoint (``finetune.init_from``) or Hugging Face directory (``model.init_from``),
head tensors from the seeded initialization. Everything else is the trainer's: data-parallel
layouts, the LR schedule (the head at ``finetune.head_lr``), checkpoints and exact resume, with
the task's examples drawn like windows and scored by accuracy and macro-F1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clusterlm import checkpoint
from clusterlm.checkpoint.directory import checkpoint_of
from clusterlm.config import Config
from clusterlm.data.classification import ExampleStream
from clusterlm.data.special_tokens import special_token_id
from clusterlm.data.task import Task, load_task
from clusterlm.errors import UserError
from clusterlm.models import Seq2SeqTransformer, create_model
from clusterlm.models.classifier import BACKBONE, SequenceClassifier
from clusterlm.models.counting import classifier_flops_per_token
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.init import ParamSource, seeded_source
from clusterlm.train.evaluate import eval_windows
from clusterlm.train.optim import OptimizerRecipe, optimizer_recipe
from clusterlm.train.pretrained_weights import pretrained_source
from clusterlm.train.session import Metrics, Session, TaskSpec, read_tokenizer
from clusterlm.train.task_metrics import task_metrics


def finetune_task(cfg: Config) -> TaskSpec:
    """Classification of ``finetune.task``'s examples by a pretrained backbone with a new head."""
    task = load_task(cfg.finetune.task, verify=cfg.data.verify)
    labels = len(task.labels)
    # An encoder reads a [CLS] token first; it follows the vocabulary the model settles on.
    vocab_size = cfg.model.vocab_size or task.manifest.vocab_size
    cls_id = special_token_id(vocab_size, "[CLS]") if cfg.model.flavour == "bert" else None
    streams = {name: ExampleStream(split, cls_id) for name, split in task.splits.items()}

    def model(settled: Config) -> tuple[nn.Module, ParamSource]:
        plain, source = build_classifier(settled, task)
        plain.freeze_lower_layers(settled.finetune.freeze_layers)
        return plain, source

    def evaluate(session: Session, split: str) -> Metrics:
        """The periodic evaluation scores the ``training.eval_batches`` global batches of examples
        spread evenly over the split; the final test scores every example."""
        limit = (
            None
            if split in session.task.final_splits
            else eval_windows(session.cfg, session.runtime.dp_size)
        )
        return task_metrics(
            session.model, session.cfg, session.runtime, streams, labels, split, limit
        )

    return TaskSpec(
        vocab_size=task.manifest.vocab_size,
        tokenizer=read_tokenizer(cfg.finetune.task, task.manifest.tokenizer.sha256),
        stream=streams["train"],
        model=model,
        flops_per_token=lambda args, settled: classifier_flops_per_token(
            args, settled.seq_len, labels
        ),
        recipe=finetune_recipe,
        evaluate=evaluate,
        final_splits=("test",),
    )


def build_classifier(cfg: Config, task: Task) -> tuple[SequenceClassifier, ParamSource]:
    """The classifier on the meta device, and where its values come from: the pretrained
    backbone's (checked to match the task's tokenizer), the seeded initialization for the rest."""
    pretrained = _pretrained_checkpoint(cfg, task)
    with torch.device("meta"):  # a pretrained model's vocabulary size came with its shape (config)
        body = create_model(resolve_model_args(cfg, task.manifest.vocab_size))
        if isinstance(body, Seq2SeqTransformer):
            raise UserError(
                "fine-tuning a classifier needs model.flavour = gpt2, llama or bert, not mbart "
                "(the encoder-decoder trains on translation tasks)"
            )
        model = SequenceClassifier(body, len(task.labels))
    seeded = seeded_source(model.init_rule, cfg.training.seed)
    backbone = checkpoint_source(pretrained.path) if pretrained else pretrained_source(cfg)
    if backbone is None:
        return model, seeded

    def source(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
        if name.startswith(BACKBONE):
            return backbone(name[len(BACKBONE) :], shape, index)
        return seeded(name, shape, index)

    return model, source


def _pretrained_checkpoint(cfg: Config, task: Task) -> checkpoint.Verified | None:
    """``finetune.init_from``'s checkpoint, verified (by rank 0).

    The task must share its tokenizer.
    """
    if not cfg.finetune.init_from:
        return None
    path = checkpoint_of(cfg.finetune.init_from)
    found = checkpoint.resolve_resume_once(str(path), path.parent) if path is not None else None
    if found is None:  # the config's loading checked it; the directory changed since
        raise UserError(
            f"finetune.init_from {cfg.finetune.init_from!r} "
            "holds no complete checkpoint any more; point it at a training run's out_dir "
            "or one of its checkpoints/step_* directories"
        )
    if found.state.get("tokenizer_sha256") != task.manifest.tokenizer.sha256:
        raise UserError(
            f"{cfg.finetune.task} was prepared with a different tokenizer "
            f"than {found.path} was trained on; "
            f"prepare the task with `--tokenizer {found.path / 'tokenizer.json'}`"
        )
    return found


def checkpoint_source(path: Path) -> ParamSource:
    """A pretrained checkpoint's model tensors, any layout, as a ``ParamSource``. Each rank reads a
    whole tensor once and slices it (the slices of one parameter are asked for one after
    another)."""
    reader = checkpoint.CheckpointReader(path)
    saved = reader.model_shapes()
    if any(name.startswith(BACKBONE) for name in saved):
        raise UserError(
            f"{path} is a fine-tuned classifier, not a pretrained model; "
            "point finetune.init_from at a pretraining run "
            "(or continue this fine-tuning with --resume)"
        )
    last: dict[str, torch.Tensor] = {}

    def read(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
        if saved.get(name) != shape:
            raise UserError(
                f"checkpoint {path} holds {name} with shape {saved.get(name)}, "
                f"the model needs {shape}; it is a checkpoint of another architecture"
            )
        if name not in last:
            last.clear()
            last[name] = reader.model_tensor(name).float()
        return last[name][index].clone()

    return read


def finetune_recipe(part: nn.Module, cfg: Config) -> OptimizerRecipe:
    """The trainer's optimizer groups, each split into backbone and head parameters; the head's
    groups run at ``finetune.head_lr`` (a scale of the scheduled LR, applied every step)."""
    recipe = optimizer_recipe(part, cfg.optim)
    classifier = next(m for m in part.modules() if isinstance(m, SequenceClassifier))
    head = {id(p) for p in classifier.head_parameters()}
    scale = cfg.finetune.head_lr / cfg.optim.lr if cfg.finetune.head_lr else 1.0
    groups = []
    for group in recipe.param_groups:
        body = [p for p in group["params"] if id(p) not in head]
        top = [p for p in group["params"] if id(p) in head]
        groups += [{**group, "params": body}, {**group, "params": top, "lr_scale": scale}]
    recipe.param_groups = [group for group in groups if group["params"]]
    return recipe
