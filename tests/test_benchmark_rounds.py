"""scripts/bench.py: results of several rounds (--rounds) merge into one per method and batch;
request lengths (--length-spread) are spread evenly and the same for every method."""

import pytest

from vllm_bastion.tools.benchmark import merge_rounds, request_lengths


def _r(method, b, tokens, seconds, rnd, outputs=((1, 2),)):
    return {"mode": "offline", "method": method, "batch_size": b, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "round": rnd,
            "outputs": [list(o) for o in outputs]}


def test_rounds_merge_into_total_tokens_over_total_seconds():
    res = [_r("ar", 1, 100, 2.0, 0), _r("bastion", 1, 100, 1.0, 0),
           _r("bastion", 1, 100, 3.0, 1, outputs=((1, 3),)), _r("ar", 1, 100, 2.0, 1)]
    out = merge_rounds(res)
    assert [(r["method"], r["batch_size"]) for r in out] == [("ar", 1), ("bastion", 1)]
    b = out[1]
    assert b["tokens_per_s"] == pytest.approx(200 / 4.0)
    assert b["tokens_per_s_rounds"] == [100.0, pytest.approx(100 / 3)]
    assert b["outputs_agree_across_rounds"] is False and out[0]["outputs_agree_across_rounds"]
    assert "round" not in b
    assert merge_rounds([_r("ar", 4, 10, 1.0, 0)])[0]["tokens_per_s"] == 10.0


def test_rounds_merge_the_steady_state_windows():
    a, b = _r("ar", 4, 100, 2.0, 0), _r("ar", 4, 100, 2.0, 1)
    a.update(window_tokens=60, window_seconds=1.0)
    b.update(window_tokens=40, window_seconds=1.0)
    assert merge_rounds([a, b])[0]["window_tokens_per_s"] == pytest.approx(50.0)


def test_request_lengths_spread_evenly_around_the_mean():
    n = request_lengths(64, 64, 0.5)
    assert n == request_lengths(64, 64, 0.5)  # the same for every method
    assert min(n) >= 32 and max(n) <= 96 and abs(sum(n) / len(n) - 64) < 2
    assert sum(x < 64 for x in n[:8]) in (3, 4, 5)  # spread over any prefix, not sorted
    assert request_lengths(5, 40, 0.0) == [40] * 5
    with pytest.raises(ValueError, match="spread"):
        request_lengths(4, 40, 1.0)
