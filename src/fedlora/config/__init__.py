"""Typed run configuration: YAML file + `--set key=value` overrides, validated field by field.

`schema` holds the sections (each validates its own fields) and `Config` (the cross-section rules);
`parser` reads YAML and overrides (dotted or unique bare keys, "did you mean", renamed keys) and dumps.
"""

from .parser import (
    RENAMED,
    config_from_dict,
    dump_config,
    load_config,
    rename_notice,
    resolve_key,
)
from .schema import (
    DEFAULT_DOLLY_PATH,
    DOLLY_HUB_ID,
    Config,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    _suggest,
    validate,
)

__all__ = [
    "DEFAULT_DOLLY_PATH", "DOLLY_HUB_ID", "RENAMED", "Config", "DataConfig", "EvalConfig", "FederationConfig",
    "LoraConfig", "MethodConfig", "ModelConfig", "OutputConfig", "TrainConfig", "config_from_dict", "dump_config",
    "load_config", "rename_notice", "resolve_key", "validate",
]
