"""vLLM general-plugin entry point (see setup.py: `vllm.general_plugins`).

vLLM calls `register()` once in every process it starts (front end, engine
core, workers), before it builds configs or workers, so `method: "bastion"`
works with no extra flag, env var or PYTHONPATH.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.bastion")  # under vLLM's log handler


def register() -> None:
    from vllm_bastion import _patches

    _patches.apply()
    if not _patches.version_supported():
        logger.warning(
            "vllm-bastion supports vLLM %sx but vLLM %s is installed; method "
            "'bastion' is unavailable.",
            _patches.SUPPORTED_VLLM_MINOR,
            _patches.vllm_version(),
        )
