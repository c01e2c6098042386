"""fmbseg: annotation-free semantic segmentation with vision foundation models (FMbSeg)."""

from fmbseg.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "__version__"]
