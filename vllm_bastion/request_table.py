"""Per-request BASTION state, kept as arrays indexed by the input batch's row.

vLLM's persistent input batch moves requests between rows only when the
batch's composition changes (a request arrives, finishes or is not
scheduled). The table mirrors it: its arrays are indexed by row, so the hot
path reads and writes them without touching Python objects per request, and
it re-lays them out (one dict lookup per request) only on a composition
change. Values of requests that leave the batch are kept until they finish,
so a request that is not scheduled for a while resumes with its state.

Every live request also owns a *slot* (a small integer, stable while the
request lives) that indexes per-request device buffers such as the drafter
backlog.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# per-request columns: name -> (dtype, default)
COLUMNS = {
    "seed": (np.int64, 0),
    "has_seed": (np.bool_, False),
    "slot": (np.int64, -1),
    "gain": (np.float64, 1.0),  # expected accepted draft tokens per drafted step
    "nodes": (np.float64, 8.0),  # expected tree size when drafting
    "idle": (np.int64, 0),  # decode steps since it last drafted
    "probe_batch": (np.int64, 0),  # batch size when it last drafted
    "probed": (np.bool_, False),  # was forced to draft (a probe) in the last gate
    "backoff": (np.int64, 0),  # its probe interval is reprobe_interval * 2**backoff
    "drafted": (np.bool_, False),  # drafted in the last step
    "depth": (np.int64, 64),  # drafter depth it may use next (core/draft_depth.py)
}


class RequestTable:
    def __init__(self, max_rows: int, columns: dict | None = None,
                 on_new_slot: Callable[[int], None] | None = None):
        self.columns = dict(COLUMNS if columns is None else columns)
        self.max_rows = max_rows
        self.req_ids: list[str] = []
        self.arrays = {k: np.full(max_rows, d, dtype=t) for k, (t, d) in self.columns.items()}
        self._parked: dict[str, dict] = {}  # values of live requests out of the batch
        self._gone: set[str] = set()  # finished while still laid out in the rows
        self._free = list(range(max_rows - 1, -1, -1))
        self.on_new_slot = on_new_slot
        self.changed = True

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name][: len(self.req_ids)]

    def defaults(self, **values) -> None:
        """Change the initial values given to requests new to the table."""
        for k, v in values.items():
            t, _ = self.columns[k]
            self.columns[k] = (t, v)

    def sync(self, req_ids: list[str], requests) -> bool:
        """Match the rows to `req_ids` (the input batch's, in row order).
        Returns True if the layout changed. `requests` maps req_id to vLLM's
        CachedRequestState (read only for requests new to the table)."""
        if req_ids == self.req_ids:
            self.changed = False
            return False
        for i, rid in enumerate(self.req_ids):  # park everyone, then take back
            vals = {k: a[i].item() for k, a in self.arrays.items()}
            if rid in self._gone:
                self._release(vals)
            else:
                self._parked[rid] = vals
        self._gone.clear()
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
        laid_out = set(self.req_ids)
        for rid in req_ids:
            vals = self._parked.pop(rid, None)
            if vals is not None:
                self._release(vals)
            elif rid in laid_out:
                self._gone.add(rid)

    def _release(self, vals: dict) -> None:
        slot = int(vals.get("slot", -1))
        if slot >= 0:
            self._free.append(slot)

    def _initial(self, req_state) -> dict:
        vals = {k: d for k, (_, d) in self.columns.items()}
        seed = getattr(getattr(req_state, "sampling_params", None), "seed", None)
        if seed is not None:
            vals["seed"] = ((int(seed) + 2**63) % 2**64) - 2**63  # as int64
            vals["has_seed"] = True
        if "slot" in vals:
            if not self._free:
                raise RuntimeError("BASTION: more live requests than request slots")
            vals["slot"] = self._free.pop()
            if self.on_new_slot is not None:
                self.on_new_slot(vals["slot"])
        return vals
