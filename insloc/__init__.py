"""insloc: InsLoc self-supervised detection pretraining (data, models, MoCo machinery, trainer, CLI)."""
from .config import PRESETS, Config

__all__ = ["Config", "PRESETS"]
