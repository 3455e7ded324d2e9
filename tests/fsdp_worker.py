"""Run swat_min.py's command line in a torchrun process (tests/test_distributed.py); with
SWAT_TEST_STOP=N, every process is interrupted as it fetches step N's batch, as a kill would."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import swat_min  # noqa: E402
from swatkit import batches  # noqa: E402

stop = int(os.environ.get("SWAT_TEST_STOP", "0"))
real_order = batches.order


def order(n, seed, epoch, calls=[0]):
    """batches.order, counting the batches fetched; at the stop-th one: an interruption."""
    calls[0] += 1
    if stop and calls[0] == stop:
        raise KeyboardInterrupt
    return real_order(n, seed, epoch)


batches.order = order
swat_min.main(sys.argv[1:])
