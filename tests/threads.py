"""Torch intra-op threads for test modules that decode the real target and start no Ray work."""

import os


def intra_op_threads(wanted: int) -> int:
    """`wanted` threads when the module runs alone; one when pytest-xdist runs another worker beside it (`make
    test` runs two): two workers with two threads each would oversubscribe the two cores, and oversubscribed
    OpenMP threads spin-wait."""
    return 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else wanted
