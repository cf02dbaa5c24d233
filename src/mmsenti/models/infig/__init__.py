"""INFIG: CLIP-assisted global and hierarchical fine-grained image-text alignment for sentiment analysis."""

from mmsenti.models.infig.alignment import (
    FeatureQueue,
    FineGrainedAlignmentLoss,
    GatherFn,
    GlobalAlignmentLoss,
    LearnableTemperature,
    fine_grained_similarity,
    make_momentum_copy,
    momentum_update,
)

__all__ = [
    "FeatureQueue",
    "FineGrainedAlignmentLoss",
    "GatherFn",
    "GlobalAlignmentLoss",
    "LearnableTemperature",
    "fine_grained_similarity",
    "make_momentum_copy",
    "momentum_update",
]
