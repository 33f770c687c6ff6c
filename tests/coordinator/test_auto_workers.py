"""How many coordinator workers ``coordinator-workers = -1`` starts."""

from __future__ import annotations

import pytest

from coordinator.workers import auto_workers


@pytest.mark.parametrize(
    ("chunks", "cores", "workers"),
    [
        (1, 2, 0),  # a single chunk: no pool
        (5, 1, 0),  # a single core: no pool
        (2, 2, 2),
        (3, 2, 3),  # CartPole's 3 chunks: 1.5 steps of time instead of 2
        (4, 2, 2),  # balanced on the cores already
        (5, 2, 3),  # 2.5 steps instead of 3
        (25, 2, 2),  # 12.5 vs 13: not worth a third process
        (250, 4, 4),
        (30, 16, 8),  # never more than 8
    ],
)
def test_worker_count_balances_chunks_over_cores(
    chunks: int, cores: int, workers: int
) -> None:
    assert auto_workers(chunks, cores) == workers
