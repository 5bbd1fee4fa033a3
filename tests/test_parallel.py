"""ordered_map: the data stages' per-image work on all cores, results in order, errors at their place."""

import threading
import time

import pytest

from onereward.data.parallel import AHEAD, ordered_map


def test_results_come_in_order_from_several_threads():
    names = set()

    def slow_square(i: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (i % 3))  # later items finish first now and then
        return i * i

    assert list(ordered_map(slow_square, range(40), workers=3)) == [i * i for i in range(40)]
    assert len(names) > 1 and all(n.startswith("onereward-data") for n in names)
    assert list(ordered_map(slow_square, range(5), workers=1)) == [0, 1, 4, 9, 16]


def test_items_are_taken_only_a_few_ahead_of_the_consumer():
    taken = []

    def items():
        for i in range(1000):
            taken.append(i)
            yield i

    results = ordered_map(lambda i: i, items(), workers=2)
    assert next(results) == 0
    assert len(taken) <= AHEAD * 2 + 1  # not the whole source read into memory
    results.close()


def test_an_error_is_raised_at_its_item_and_cancels_the_queued_ones():
    ran = []

    def fails_at_7(i: int) -> int:
        ran.append(i)
        if i == 7:
            raise ValueError("row 7: not an image")
        time.sleep(0.05)  # the queue fills up while the items run
        return i

    seen = []
    with pytest.raises(ValueError, match="row 7"):
        for r in ordered_map(fails_at_7, range(100), workers=2):
            seen.append(r)
    assert seen == list(range(7))
    assert len(ran) < 7 + AHEAD * 2  # what was queued behind the error never ran
