"""Latency measured inside the validation loop, summarised so that latency and throughput tell the same story.

One statistic for both: the median time per batch over the batches of the most common size, after the
warm-up batch; throughput is that batch size divided by that median. Backends run in a rotating order,
so no backend always pays for being first after the data loader. Latencies measured on the CPU (a shared
machine, Python in the loop) are marked ``indicative``; ``qatsparse bench`` measures properly.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

#: Batches at the start of validation run but not timed (first-call set-up: allocations, thread pools,
#: lazy initialisation of each backend).
WARMUP_BATCHES = 1


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` starting at position ``k`` (mod its length): batch ``k``'s backend order.

    Example:
        >>> rotated(["a", "b", "c"], 4)
        ['b', 'c', 'a']
    """
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def latency_summary(times_ms: Sequence[float], sizes: Sequence[int], device: str = "cpu") -> dict[str, Any]:
    """Median ms per batch and samples/s from that same median, over the timed batches of the modal size.

    ``times_ms[i]`` is batch ``i``'s time and ``sizes[i]`` its size, in order; the first
    :data:`WARMUP_BATCHES` are dropped when there are more batches than that.

    Example:
        >>> s = latency_summary([50.0, 10.0, 12.0, 11.0, 3.0], [32, 32, 32, 32, 8])
        >>> s["median_per_batch"], s["batch_size"], round(s["throughput_per_s"], 1), s["batches"]
        (11.0, 32, 2909.1, 3)
    """
    warmup = WARMUP_BATCHES if len(times_ms) > WARMUP_BATCHES else 0
    timed = list(zip(times_ms[warmup:], sizes[warmup:]))
    if not timed:
        return {}
    size = Counter(n for _, n in timed).most_common(1)[0][0]
    same = [t for t, n in timed if n == size]
    med = statistics.median(same)
    return {
        "median_per_batch": med,
        "batch_size": size,
        "throughput_per_s": size * 1e3 / med if med > 0 else float("inf"),
        "batches": len(same),
        "warmup_batches": warmup,
        "statistic": "median",
        "device": device,
        "indicative": device == "cpu",
    }
