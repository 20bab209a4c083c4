"""Training reward models from preference pairs (``dealign train-reward``)."""

from .data import DataError, Pair, helpful_pairs, is_refusal, load_pairs, parse_dialogue, split_pairs
from .model import EmbeddingRewardModel, EnsembleRewardModel, is_reward_folder, load_reward_folder
from .train import TrainReport, pairwise_accuracy, train_reward

__all__ = [
    "DataError",
    "EmbeddingRewardModel",
    "EnsembleRewardModel",
    "Pair",
    "TrainReport",
    "helpful_pairs",
    "is_refusal",
    "is_reward_folder",
    "load_pairs",
    "load_reward_folder",
    "pairwise_accuracy",
    "parse_dialogue",
    "split_pairs",
    "train_reward",
]
