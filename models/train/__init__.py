"""Training of the HoVerServe default model: targets, losses, augmentation, data, loop, export."""

import os

# OpenMP threads that spin while waiting make PyTorch training on a busy, shared CPU up to ~10x
# slower (measured here: 2 threads, 2 cores, load ~8). Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from models.train.config import TrainConfig, load_config
from models.train.loop import build_model, run_training, train
from models.train.release import card_for, export_trained, load_checkpoint

__all__ = [
    "TrainConfig",
    "build_model",
    "card_for",
    "export_trained",
    "load_checkpoint",
    "load_config",
    "run_training",
    "train",
]
