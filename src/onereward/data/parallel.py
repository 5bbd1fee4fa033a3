"""Per-image work on several cores, in threads: PIL's decode, resize and encode and most numpy work release the
GIL, so threads run them side by side without copying images between processes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from onereward import machine

In = TypeVar("In")
Out = TypeVar("Out")
AHEAD = 4  # items queued a thread: enough to keep the threads busy, few enough to bound memory
# Each running item may hold a large decoded image (curate.max_pixels): the affinity mask of a pod with a CPU
# limit can name every CPU of the node, so the default stops here.
MAX_WORKERS = 8


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], workers: int | None = None) -> Iterator[Out]:
    """fn over items, results in the items' order, on `workers` threads (default: the cores, at most
    MAX_WORKERS). Items are taken from `items` only as results are consumed. An error (or the consumer
    stopping) cancels the queued items; only those already running finish."""
    workers = workers or min(machine.cores(), MAX_WORKERS)
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="onereward-data")
    window: deque[Future[Out]] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= AHEAD * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
