"""Semantic-segmentation metrics as a confusion-matrix accumulator (STYLE 10).

``ConfusionMatrix`` counts ``(truth, prediction)`` pixel pairs with one vectorised
``np.bincount`` per update, merges exactly across shards/workers (counts add), and
serialises to a plain dict so it travels from Ray workers or into JSON reports.

Definitions follow mmsegmentation's ``IoUMetric`` / ``intersect_and_union``:
- pixels whose truth is ``ignore_index`` are not counted at all;
- a predicted value outside ``[0, num_classes)`` (e.g. 255 for "unlabelled" in a
  pseudo-label) is "no prediction": the pixel still counts toward its true class's total (a
  miss), but toward no predicted class;
- ``IoU_c = TP_c / (truth_c + pred_c - TP_c)``, ``Acc_c = TP_c / truth_c``; a class with no
  truth and no prediction pixels has IoU NaN (excluded from mIoU, as mmseg's ``nanmean``),
  a class with no truth pixels has Acc NaN; a class predicted but absent from the truth has
  IoU 0 and counts;
- ``aAcc = sum TP / sum truth``; ``mIoU``/``mAcc`` are NaN-means.
Values are fractions in [0, 1] (mmseg prints percentages).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_numpy(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{what}: expected an integer label array, got dtype {arr.dtype}")
    return arr


class ConfusionMatrix:
    """Pixel counts of (truth, prediction) pairs over ``num_classes`` classes.

    ``matrix`` is ``(K, K + 1) int64``: row = true class, column = predicted class, the last
    column = "no valid prediction" (prediction outside ``[0, K)``).

    Args:
        num_classes: K, the number of evaluated classes (labels ``0..K-1``).
        ignore_index: truth value of pixels that are not evaluated (255 by convention).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(
                f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ConfusionMatrix: ignore_index {ignore_index} collides with a class id "
                f"(0..{num_classes - 1})"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    # ---- accumulation ---------------------------------------------------------------------

    def update(self, pred: Any, target: Any) -> None:
        """Add one (or a batch of) prediction/truth label maps of identical shape.

        ``pred`` and ``target`` are integer arrays or tensors (``HxW``, ``BxHxW``...). Truth
        values must be class ids or ``ignore_index``; anything else is a ValueError naming
        the offending values (a wrong ``num_classes`` or a mis-read label file).
        """
        p = _as_numpy(pred, "ConfusionMatrix.update pred")
        t = _as_numpy(target, "ConfusionMatrix.update target")
        if p.shape != t.shape:
            raise ValueError(
                f"ConfusionMatrix.update: prediction shape {p.shape} != target shape {t.shape}"
            )
        k = self.num_classes
        rows = self._row_index(t.ravel())
        if rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi > k:
            flat = t.ravel()
            bad = np.unique(flat[(flat < 0) | ((flat >= k) & (flat != self.ignore_index))])
            raise ValueError(
                f"ConfusionMatrix.update: target has values {bad[:10].tolist()} that are "
                f"neither class ids 0..{k - 1} nor ignore_index {self.ignore_index}"
            )
        rows *= k + 1
        rows += self._col_index(p.ravel())
        # Ignored pixels land in an extra row K that is dropped: no boolean compaction pass.
        counts = np.bincount(rows, minlength=(k + 1) * (k + 1))
        self.matrix += counts[: k * (k + 1)].reshape(k, k + 1)

    def _row_index(self, t: np.ndarray) -> np.ndarray:
        """Truth -> row: class ids as is, ignore -> K, other values -> out of [0, K]."""
        k = self.num_classes
        if t.dtype == np.uint8:
            lut = np.arange(256, dtype=np.intp)
            lut[k:] = k + 1  # invalid unless it is the ignore value
            if 0 <= self.ignore_index < 256:
                lut[self.ignore_index] = k
            return lut[t]
        rows = t.astype(np.intp, copy=True)
        rows[(rows >= k) & (rows != self.ignore_index)] = k + 1
        rows[t == self.ignore_index] = k
        return rows

    def _col_index(self, p: np.ndarray) -> np.ndarray:
        """Prediction -> column: class ids as is, anything outside [0, K) -> K."""
        k = self.num_classes
        if p.dtype == np.uint8:
            lut = np.minimum(np.arange(256, dtype=np.intp), k)
            return lut[p]
        cols = p.astype(np.intp, copy=True)
        cols[(cols < 0) | (cols >= k)] = k
        return cols

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one (in place); returns ``self``."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"ConfusionMatrix.merge: cannot merge K={other.num_classes}/ignore="
                f"{other.ignore_index} into K={self.num_classes}/ignore={self.ignore_index}"
            )
        self.matrix += other.matrix
        return self

    # ---- results --------------------------------------------------------------------------

    @property
    def num_pixels(self) -> int:
        """Evaluated (non-ignored) truth pixels so far."""
        return int(self.matrix.sum())

    def compute(self) -> dict[str, Any]:
        """Metrics so far.

        Returns a dict: ``mIoU``, ``mAcc``, ``aAcc`` (floats, NaN when nothing counted),
        ``IoU`` and ``Acc`` (lists of K floats, NaN for excluded classes), ``pixels``
        (evaluated pixels) and ``coverage`` (fraction of them with a valid prediction).
        """
        k = self.num_classes
        m = self.matrix.astype(np.float64)
        tp = np.diag(m[:, :k])
        truth = m.sum(axis=1)
        pred = m[:, :k].sum(axis=0)
        union = truth + pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(truth > 0, tp / truth, np.nan)
        total = truth.sum()
        # NaN, not nanmean's "mean of empty slice" warning, when no class has a value
        miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan
        macc = float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan
        return {
            "mIoU": miou,
            "mAcc": macc,
            "aAcc": float(tp.sum() / total) if total else math.nan,
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
            "pixels": int(total),
            "coverage": float(1.0 - m[:, k].sum() / total) if total else math.nan,
        }

    # ---- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` rebuilds an equal accumulator."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfusionMatrix:
        try:
            cm = cls(int(data["num_classes"]), int(data["ignore_index"]))
            matrix = np.asarray(data["matrix"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ConfusionMatrix.from_dict: malformed data ({exc})") from exc
        if matrix.shape != cm.matrix.shape:
            raise ValueError(
                f"ConfusionMatrix.from_dict: matrix shape {matrix.shape}, expected {cm.matrix.shape}"
            )
        if (matrix < 0).any():
            raise ValueError("ConfusionMatrix.from_dict: negative counts")
        cm.matrix = matrix
        return cm

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ConfusionMatrix)
            and other.num_classes == self.num_classes
            and other.ignore_index == self.ignore_index
            and np.array_equal(other.matrix, self.matrix)
        )

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.num_pixels})"
