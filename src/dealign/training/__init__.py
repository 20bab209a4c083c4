"""Training reward heads from preference pairs (``dealign train-reward``).  Only training lives here: the
heads, backbones and folders the search scores with are :mod:`dealign.rewards.learned` and
:mod:`dealign.rewards.backbones`."""

from .data import DataError, Pair, helpful_pairs, load_pairs, parse_dialogue, split_pairs
from .train import TrainReport, pairwise_accuracy, train_reward

__all__ = [
    "DataError",
    "Pair",
    "TrainReport",
    "helpful_pairs",
    "load_pairs",
    "pairwise_accuracy",
    "parse_dialogue",
    "split_pairs",
    "train_reward",
]
