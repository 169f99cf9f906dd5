"""The short version of bench/load.py in the suite: 16 clients for a few seconds against a real
`python -m service` on the tiny checkpoint, with few rows so that bursts are refused, and a quarter of
the clients hostile (valid but extreme settings). Nothing fails, good or hostile; refusals are 429/503
with Retry-After only (and 4xx for hostile settings refused at the edge); every row is given back,
memory does not grow, the engine process never dies."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import MIB, LoadConfig, run_load
from tests.server_utils import running_server

pytestmark = pytest.mark.slow

# A run this short cannot show a slow leak; it catches a per-request one of more than ~100 KiB.
RSS_NOISE_BOUND = 32 * MIB


def test_short_load_run_loses_nothing(tiny_checkpoint: Path) -> None:
    config = LoadConfig(clients=16, duration_s=8.0, max_new_tokens=64, disconnect_share=0.3,
                        burst_every_s=3.0, request_timeout_s=60.0, seed=6, hostile_share=0.25)
    with running_server(tiny_checkpoint, "--max-batch-size", "4", "--max-queue", "8",
                        "--log-level", "warning") as server:
        report = run_load(server.base_url, server.process.pid, config)
        assert server.process.poll() is None, server.log()
    print(report.table())

    assert report.failed == 0, report.table()
    assert set(report.good.refused) <= {429, 503}  # `send` counts a refusal only when it carries Retry-After
    refused = sum(report.good.refused.values())
    assert report.good.sent == report.good.completed + report.good.disconnected + refused + report.failed
    # A burst is max_batch_size + max_queue + 8 requests on top of the 16 clients: some must be refused.
    assert report.bursts >= 1 and report.good.refused[429] >= 8
    assert report.good.completed > 0 and report.good.disconnected > 0 and report.ttfc_s
    assert report.rows_after == 0 and report.queue_after == 0
    assert report.rss_growth < RSS_NOISE_BOUND, report.table()

    hostile = report.hostile
    assert report.hostile_clients == 4 and hostile.sent > 0
    assert hostile.failed == 0, report.table()  # a 200 or a 4xx (or a refusal with Retry-After), never a 5xx
    assert set(hostile.rejected) <= {400, 422} and set(hostile.refused) <= {429, 503}
    assert hostile.sent == hostile.completed + sum(hostile.refused.values()) + sum(hostile.rejected.values())
    assert report.restarts == 0 and report.good.killed == 0 and report.ok
