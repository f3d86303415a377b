"""A moving average of a measured duration that one slow sample cannot move far. Pure python.

Step timings on a shared machine have one-off outliers (a compilation on a
new shape, a page fault storm, another process): a plain EMA started or hit
by one of them steers every later decision that reads it. `RobustEma`
clips each sample's relative change (Huber style) and accepts a level change
only after `confirm` consecutive outliers on the same side, so a bad first
sample is gone after `confirm` normal ones.
"""

from __future__ import annotations

import math


class OutlierClip:
    """Huber-style clipping of a sample against a reference (the current
    estimate or prediction), shared by `RobustEma` and the drafter's
    `LinearCost`: a sample further than `clip` (relative) from the reference
    is moved to that distance, unless it is the `confirm`-th such sample in a
    row on the same side, which is a level change and passes as measured."""

    def __init__(self, clip: float = 0.5, confirm: int = 3):
        self.clip = float(clip)
        self.confirm = int(confirm)
        self._run = 0
        self._sign = 0

    def reset(self) -> None:
        """Forget the current run of outliers."""
        self._run = 0

    def __call__(self, ref: float, x: float) -> tuple[float, bool]:
        """(the sample to use, whether it is a confirmed level change)."""
        if abs(x - ref) <= self.clip * ref:
            self.reset()
            return x, False
        sign = 1 if x > ref else -1
        self._run = self._run + 1 if sign == self._sign else 1
        self._sign = sign
        if self._run >= self.confirm:
            self.reset()
            return x, True
        return ref * (1 + sign * self.clip), False


class RobustEma:
    """EMA of a positive quantity (e.g. measured T_fix) with Huber-style
    clipping of isolated outliers; `confirm` consecutive same-sign outliers
    are accepted as a level change."""

    def __init__(self, value: float | None = None, alpha: float = 0.1, clip: float = 0.5, confirm: int = 3):
        self.value = None if value is None else float(value)
        self.alpha = float(alpha)
        self._clip = OutlierClip(clip, confirm)

    def update(self, x: float) -> float | None:
        x = float(x)
        if not math.isfinite(x) or x < 0:
            return self.value
        if self.value is None or self.value <= 0:
            self.value = x
            return self.value
        x, jump = self._clip(self.value, x)
        if jump:
            self.value = x  # level change confirmed: jump
        else:
            self.value = max(0.0, self.value + self.alpha * (x - self.value))
        return self.value
