"""Per-request BASTION state, kept as arrays indexed by the input batch's row.

vLLM's persistent input batch moves requests between rows only when the
batch's composition changes (a request arrives, finishes or is not
scheduled). The table mirrors it: its arrays are indexed by row, so the hot
path reads them without touching Python objects per request, and it
re-lays them out (one dict lookup per request) only on a composition change.
Values of requests that leave the batch are kept until they finish, so a
request that is not scheduled for a while resumes with its state.
"""

from __future__ import annotations

import numpy as np

# per-request columns: name -> (dtype, default)
COLUMNS = {
    "seed": (np.int64, 0),
    "has_seed": (np.bool_, False),
}


class RequestTable:
    def __init__(self, max_rows: int, columns: dict | None = None):
        self.columns = dict(COLUMNS if columns is None else columns)
        self.max_rows = max_rows
        self.req_ids: list[str] = []
        self.arrays = {k: np.full(max_rows, d, dtype=t) for k, (t, d) in self.columns.items()}
        self._parked: dict[str, dict] = {}  # values of requests out of the batch
        self.changed = True

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name][: len(self.req_ids)]

    def sync(self, req_ids: list[str], requests) -> bool:
        """Match the rows to `req_ids` (the input batch's, in row order).
        Returns True if the layout changed. `requests` maps req_id to vLLM's
        CachedRequestState (read only for requests new to the table)."""
        if req_ids == self.req_ids:
            self.changed = False
            return False
        old = {rid: i for i, rid in enumerate(self.req_ids)}
        for rid, i in old.items():  # park everyone, then take back
            self._parked[rid] = {k: a[i].item() for k, a in self.arrays.items()}
        for i, rid in enumerate(req_ids):
            vals = self._parked.pop(rid, None)
            if vals is None:
                vals = self._initial(requests[rid])
            for k, v in vals.items():
                self.arrays[k][i] = v
        self.req_ids = list(req_ids)
        self.changed = True
        return True

    def finish(self, req_ids) -> None:
        """Forget requests that finished (or were preempted and will restart)."""
        for rid in req_ids:
            self._parked.pop(rid, None)

    def _initial(self, req_state) -> dict:
        vals = {k: d for k, (_, d) in self.columns.items()}
        seed = getattr(getattr(req_state, "sampling_params", None), "seed", None)
        if seed is not None:
            vals["seed"] = ((int(seed) + 2**63) % 2**64) - 2**63  # as int64
            vals["has_seed"] = True
        return vals
