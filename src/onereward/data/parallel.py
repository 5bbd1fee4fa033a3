"""Per-image work on every core, in threads: PIL's decode, resize and encode and most numpy work release the GIL,
so threads run them side by side without copying images between processes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from onereward import machine

In = TypeVar("In")
Out = TypeVar("Out")
AHEAD = 4  # items in flight a thread: enough to keep the threads busy, few enough to bound memory


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], workers: int | None = None) -> Iterator[Out]:
    """fn over items, results in the items' order, on `workers` threads (default: the cores). Items are taken
    from `items` only as results are consumed; an error is raised at its item's place, after the few items
    already in flight have finished."""
    workers = workers or machine.cores()
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="onereward-data") as pool:
        window: deque[Future[Out]] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= AHEAD * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
