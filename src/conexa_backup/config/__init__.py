"""Configuration: pydantic models and the loader for ``backup.toml``."""

from conexa_backup.config.loading import find_config, load_config, parse_config
from conexa_backup.config.models import (
    CompressionConfig,
    Config,
    DatabaseConfig,
    DrillConfig,
    UploadsConfig,
)

__all__ = [
    "CompressionConfig",
    "Config",
    "DatabaseConfig",
    "DrillConfig",
    "UploadsConfig",
    "find_config",
    "load_config",
    "parse_config",
]
