"""The local rank processes behind the multiprocess executor: a rank's failure reaches the driver
with its traceback instead of a hang, and the world stays usable; two worlds coexist on one node
(each rendezvous on a port the OS picked)."""

from __future__ import annotations

import pytest
from rank_jobs import fail_on

from executors.base import RankFailure


def test_a_failing_rank_raises_in_the_driver_with_its_traceback(world2):
    with pytest.raises(RankFailure, match="planted failure on rank 1"):
        world2.call(fail_on, 1, 0.3, "late")  # rank 0's answer arrives after the failure
    assert world2.call(fail_on, -1, 0.0, "next") == ["next0", "next1"]  # not rank 0's late answer
    assert world2.call(fail_on, -1) == ["0", "1"]  # still in step


def test_two_worlds_run_side_by_side(world2, world4):
    assert world2.call(fail_on, -1) == ["0", "1"]
    assert world4.call(fail_on, -1) == ["0", "1", "2", "3"]
