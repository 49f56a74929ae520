"""One typed config tree: dataclass sections, loaded from TOML, overridden by dotted CLI keys.

    clusterlm train --config configs/nano-cpu.toml --training.steps 200 --optim.lr 3e-4

Every field carries its meaning in ``help`` metadata, which ``--help`` prints with the default.
Unknown keys fail with the closest valid key; impossible values fail in ``validate`` with one line.
A config is a frozen value: overrides and derived values make a new one (``dataclasses.replace``).
Sections live in ``sections.py`` (those of the parallel layout in ``parallelism.py``), loading in
``loading.py``, the checks in ``checks.py``, the layout's degrees in ``degrees.py`` and the values
derived from config and data in ``derive.py``.
"""

from clusterlm.config.checks import validate
from clusterlm.config.derive import grad_accum_steps, settle_model
from clusterlm.config.loading import (
    all_keys,
    apply_overrides,
    build_config,
    config_from_dict,
    load_toml,
)
from clusterlm.config.parallelism import CommConfig, ParallelConfig
from clusterlm.config.sections import (
    CheckpointConfig,
    Config,
    DataConfig,
    FinetuneConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    TrainingConfig,
)
from clusterlm.config.setting import setting

__all__ = [
    "CheckpointConfig",
    "CommConfig",
    "Config",
    "DataConfig",
    "FinetuneConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainingConfig",
    "all_keys",
    "apply_overrides",
    "build_config",
    "config_from_dict",
    "grad_accum_steps",
    "load_toml",
    "setting",
    "settle_model",
    "validate",
]
