"""Measured verdicts replace estimated ones where a census saw the layer.

The estimate (``analysis`` + ``refine``) always runs; a census over real inputs
(``census:sample``) or inputs distilled from the BN statistics
(``census:distilled``) then decides dead / near-dead for the layers it ran, and
the estimate's disagreement with it is kept as a continuous check of the
estimate. BN-side classes (collapsed gamma, dead input, constant) stay the
estimate's: they are statements about the weights, not about activity.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bnexporter.detection.analysis import Thresholds, indices
from bnexporter.detection.census import BNActivity
from bnexporter.report import RELU_LIKE, LayerReport

# fewer positions per channel than this: a census "never positive" is weak evidence
MIN_POSITIONS = 500


def apply_census(layer: LayerReport, activity: BNActivity, evidence: str,
                 th: Thresholds) -> LayerReport:
    """``layer`` with dead / near-dead measured by ``activity`` (same channel count)."""
    if activity.channels != layer.channels:
        return layer
    dead_mask = activity.positive_count == 0
    near_mask = ~dead_mask & (activity.active < th.near_dead_p)
    classes = dict(layer.classes)
    estimate_dead = set(layer.dead) | set(layer.would_be_dead)
    if layer.consumer in RELU_LIKE:
        classes["dead"] = indices(dead_mask)
        classes["near_dead"] = indices(near_mask)
    elif layer.consumer == "unknown":
        classes["would_be_dead"] = indices(dead_mask)
    measured = set(indices(dead_mask))
    if layer.consumer == "relu6" and activity.saturated is not None:
        classes["saturated"] = indices(activity.saturated >= 1.0)
    return replace(layer, classes=classes, evidence=evidence,
                   census_positions=int(activity.positions),
                   estimate_disagreement=len(estimate_dead ^ measured),
                   min_p_active=float(np.min(activity.active)) if activity.channels else None)
