import time

from clusterlm.train.injected_slowdown import slowed


def test_slowed_sleeps_in_proportion_to_the_work():
    start = time.perf_counter()
    with slowed(3.0):
        time.sleep(0.05)
    assert time.perf_counter() - start >= 0.15 - 0.01
