"""lightning-timeprest: pipeline-parallel training of unchanged LightningModules.

Importing the package registers the strategy names with Lightning, so ``Trainer(strategy="gpipe")`` works.
"""

from lightning_timeprest import errors
from lightning_timeprest.errors import *  # noqa: F403  (the error classes, exported as they are listed there)
from lightning_timeprest.registry import register
from lightning_timeprest.schedules import SCHEDULES
from lightning_timeprest.strategy import TiMePReStStrategy

__all__ = ["SCHEDULES", "TiMePReStStrategy", *errors.__all__]
__version__ = "0.1.0"

register()
