"""Training: continued pretraining and selective fine-tuning of a model with gist tokens."""

from gsa.train.config import TrainConfig, load_config
from gsa.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
