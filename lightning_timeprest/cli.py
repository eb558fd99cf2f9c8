"""``lightning-timeprest``: Lightning's own ``LightningCLI`` with the pipeline strategies registered.

    lightning-timeprest fit --config examples/configs/spirals_gpipe.yaml

A yaml may name the strategy bare (``strategy: gpipe``) because this package is imported before the Trainer
is built, or as ``class_path: lightning_timeprest.TiMePReStStrategy`` with ``init_args``. Any LightningModule
and LightningDataModule can be given by ``class_path``; the current directory is importable, as with
``python -m``, so a project's own modules resolve.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import lightning_timeprest  # noqa: F401  (registers the strategy names)

__all__ = ["main"]


def main(args: list[str] | None = None) -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
