"""Segmentation metrics computed by the engine (the same code as ``segment --labels``).

``pred`` and ``truth`` are arrays of one shape; anything non-zero is foreground. ``spacing``
gives the voxel size per axis (default 1), so HD95 is in mm for a NIfTI volume's spacing.
Conventions for empty masks: both empty gives Dice 1, IoU 1, HD95 0; one empty gives Dice 0,
IoU 0 and an infinite HD95.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from . import _medsa

__all__ = ["dice", "iou", "hd95", "scores"]


def _masks(pred: Any, truth: Any, spacing: Optional[Sequence[float]], what: str):
    """Boolean C-contiguous views of both masks and the spacing in their axis order."""
    p = np.asarray(pred) != 0
    t = np.asarray(truth) != 0
    sp = [1.0] * p.ndim if spacing is None else [float(s) for s in spacing]
    if len(sp) != p.ndim:
        raise _medsa.MedsaError(
            f"{what}: {len(sp)} spacing values for an array of {p.ndim} dimensions"
        )
    # The engine reads C order; an F-ordered array is read as its transpose (no copy).
    if not p.flags.c_contiguous and p.flags.f_contiguous and t.flags.f_contiguous:
        p, t, sp = p.T, t.T, sp[::-1]
    return np.ascontiguousarray(p), np.ascontiguousarray(t), sp


def scores(pred: Any, truth: Any, spacing: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Dice, IoU and HD95 of ``pred`` against ``truth``: ``{"dice", "iou", "hd95"}``."""
    p, t, sp = _masks(pred, truth, spacing, "scores")
    d, i, h = _medsa.scores(p, t, sp)
    return {"dice": d, "iou": i, "hd95": h}


def dice(pred: Any, truth: Any) -> float:
    """``2|A∩B| / (|A| + |B|)`` (counts only: no distance transform)."""
    p, t, _ = _masks(pred, truth, None, "dice")
    return _medsa.overlap(p, t)[0]


def iou(pred: Any, truth: Any) -> float:
    """``|A∩B| / |A∪B|`` (counts only: no distance transform)."""
    p, t, _ = _masks(pred, truth, None, "iou")
    return _medsa.overlap(p, t)[1]


def hd95(pred: Any, truth: Any, spacing: Optional[Sequence[float]] = None) -> float:
    """The 95th-percentile symmetric Hausdorff distance, in the units of ``spacing``."""
    return scores(pred, truth, spacing)["hd95"]
