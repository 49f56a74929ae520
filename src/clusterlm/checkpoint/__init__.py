"""Checkpoints: what a checkpoint directory holds (``directory``), saving and loading it through
``torch.distributed.checkpoint`` with verification (``dcp_io``), the tensors stored as raw bytes
with a JSON index checked before anything is read (``tensor_storage``, ``tensor_index``), saving
while training goes on (``async_writer``), and choosing the checkpoint a run resumes from
(``resume``)."""

from clusterlm.checkpoint.async_writer import CheckpointWriter
from clusterlm.checkpoint.dcp_io import (
    LATEST,
    CheckpointReader,
    begin_checkpoint,
    check_compatible,
    finish_checkpoint,
    save_checkpoint,
    single_process_quiet,
    verify,
)
from clusterlm.checkpoint.directory import (
    AVERAGED_FROM,
    COMPLETE,
    TRAINER_STATE,
    checkpoint_of,
    list_complete,
)
from clusterlm.checkpoint.resume import (
    Verified,
    find_checkpoint,
    resolve_resume,
    resolve_resume_once,
)

__all__ = [
    "AVERAGED_FROM",
    "COMPLETE",
    "LATEST",
    "TRAINER_STATE",
    "CheckpointReader",
    "CheckpointWriter",
    "Verified",
    "begin_checkpoint",
    "check_compatible",
    "checkpoint_of",
    "find_checkpoint",
    "finish_checkpoint",
    "list_complete",
    "resolve_resume",
    "resolve_resume_once",
    "save_checkpoint",
    "single_process_quiet",
    "verify",
]
