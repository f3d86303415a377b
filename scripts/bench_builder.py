"""Time the pure-torch tree builder and the batch budget per step, next to the
step time they plan for.

    python scripts/bench_builder.py [--batch-sizes 1 8 64] [--depth 15] [--topk 8]
                                    [--max-nodes 64] [--device cpu|cuda]

For each batch size: random drafter top-k log-probs of the default pair's
shape (softmax of Gumbel logits, sorted), the acceptance calibrator's class
values, the vectorized best-first builder at max_nodes, the exact batch-wide
budget (argmax of S / (T_fix + C(n)) over merged best-first prefixes) and the
truncation to the plan. "step" is the latency model's time for the planned
step (verify forward of the planned trees + T_fix), from the calibrated
profile of the default pair cached by the engine or
`python -m vllm_bastion.calibrate` (else the uncalibrated device prior).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_bastion.core.acceptance import AcceptanceCalibrator  # noqa: E402
from vllm_bastion.core.budget import plan_batch_budget  # noqa: E402
