"""Sequence-level rewards on padded token-id tensors (pure torch, batched).

BLEU and chrF / chrF++ (sacrebleu-exact, incl. per-prefix scores), edit /
Hamming distances, a reward registry and a subword-to-word merger.  No fairseq
import here: the functions only need ``torch`` and follow the input tensors' device.
"""

from .bleu import (SMOOTH_METHODS, BleuStats, bleu_from_stats, bleu_stats, corpus_bleu_from_stats,
                   prefix_bleu, prefix_bleu_stats, sentence_bleu)
from .chrf import ChrF, chrf_from_counts
from .edit import (edit_distance, hamming, normalized_edit_distance, normalized_hamming,
                   prefix_edit_distance, prefix_hamming, prefix_normalized_edit_distance,
                   prefix_normalized_hamming)
from .ngrams import PAIRWISE_ELEMENT_BUDGET
from .pairwise import PAIRWISE_DISTANCES, bleu34_distance, pairwise_distances
from .registry import Reward, available_rewards, get_reward, register_reward
from .words import WordMerger
from .binding import BoundReward, bind_reward, detect_subword_style  # noqa: E402  (needs the above)

__all__ = [
    "SMOOTH_METHODS", "BleuStats", "bleu_from_stats", "bleu_stats", "corpus_bleu_from_stats",
    "prefix_bleu", "prefix_bleu_stats", "sentence_bleu",
    "ChrF", "chrf_from_counts",
    "edit_distance", "hamming", "normalized_edit_distance", "normalized_hamming",
    "prefix_edit_distance", "prefix_hamming", "prefix_normalized_edit_distance",
    "prefix_normalized_hamming",
    "PAIRWISE_ELEMENT_BUDGET", "PAIRWISE_DISTANCES", "bleu34_distance", "pairwise_distances",
    "Reward", "available_rewards", "get_reward", "register_reward",
    "WordMerger",
    "BoundReward", "bind_reward", "detect_subword_style",
]
