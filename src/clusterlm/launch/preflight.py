"""What the launcher checks before torchrun starts a worker: every input the workers would each
find wrong, found here once and told in one line. The workers check again (a file can change in
between, and a job started by plain torchrun or mpirun has no launcher), and what only a worker
can find (a shard whose bytes changed, seen by its sha256) still ends the job with one line
(``clusterlm.launch.agent``).

Checked: the prepared corpus (its manifest loads and every file it lists is there at its size)
or the labelled task of a fine-tuning run, the Hugging Face directory of ``model.init_from``, the
pretrained run of ``finetune.init_from``, an end-of-text separator where document masking needs
one, a checkpoint given to ``checkpoint.resume``,
``training.out_dir`` (not a file), and the layout on every world size the job can have.
"""

from __future__ import annotations

from pathlib import Path

from clusterlm.checkpoint.directory import COMPLETE
from clusterlm.config import Config
from clusterlm.config.pretrained import pretrained_dir
from clusterlm.data.manifest import check_files_present
from clusterlm.data.packing import packing_for
from clusterlm.data.task import load_task
from clusterlm.data.translation import is_translation_dir, load_translation
from clusterlm.errors import UserError
from clusterlm.files import check_output_path
from clusterlm.interop.pretrained_shape import pretrained_checkpoint_model
from clusterlm.interop.source import hf_config_json
from clusterlm.launch.elastic import check_sizes


def preflight(cfg: Config, nproc: int, nnodes: str) -> None:
    """Every check of the job's inputs that needs no worker; raises UserError at the first
    problem."""
    check_sizes(cfg, nproc, nnodes)
    check_output_path(cfg.training.out_dir, "training.out_dir")
    if cfg.finetune.task:
        load_task(
            cfg.finetune.task, verify=False
        )  # the manifest, and each file at its recorded size
    elif is_translation_dir(cfg.data.dir):
        load_translation(cfg.data.dir, verify=False)
    else:
        manifest = check_files_present(cfg.data.dir)
        packing_for(manifest.eot_id, cfg.data.document_masking, cfg.model.position_reset)
    directory = pretrained_dir(cfg)
    if directory is not None:
        hf_config_json(directory)
    if cfg.finetune.init_from:
        pretrained_checkpoint_model(cfg.finetune.init_from)
    resume = cfg.checkpoint.resume
    if resume not in ("none", "auto") and not (Path(resume) / COMPLETE).is_file():
        raise UserError(
            f"checkpoint.resume {resume} is not a complete checkpoint (no {COMPLETE}); give a "
            "checkpoints/step_* directory, auto for the newest in training.out_dir, or none"
        )
