"""A job that stops making progress ends itself and says where every rank is; SIGTERM ends a stuck job.

The job: 4 data-parallel ranks; at its second step rank 1 enters an all-reduce on a side group that rank 0
never enters, so rank 1 waits there and the others wait for rank 1 in the next FSDP collective. Neither main
thread returns to Python (no signal handler runs, no exception is raised) until the process-group timeout
(set to 10 minutes here).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from lightning_mp import ModelParallelStrategy
from lightning_mp.config import progress_timeout_seconds
from lightning_mp.processes.watch import _suspects


# ---------------------------------------------------------------- fast: the argument and the report
def test_progress_timeout_defaults_below_the_process_group_timeout_and_rejects_bad_values():
    assert progress_timeout_seconds("auto", timedelta(minutes=30)) == 300.0
    assert progress_timeout_seconds("auto", timedelta(seconds=60)) == 30.0
    assert progress_timeout_seconds(timedelta(seconds=90), timedelta(minutes=30)) == 90.0
    assert progress_timeout_seconds(None, timedelta(minutes=30)) is None
    with pytest.raises(ValueError, match=r"progress_timeout=60 s is not shorter than the process-group timeout=60 s"):
        ModelParallelStrategy(timeout=timedelta(seconds=60), progress_timeout=60)
    for bad in (0, -5, "soon", True):
        with pytest.raises(ValueError, match=r"progress_timeout=.*give seconds \(a positive number\)"):
            progress_timeout_seconds(bad, timedelta(minutes=30))


def test_the_report_names_the_rank_that_is_behind_or_elsewhere():
    assert _suspects({0: (5, "a"), 1: (4, "b"), 2: (5, "a")}, []) == \
        " rank 1 is behind (4 steps completed, the others more);"
    assert _suspects({0: (4, "gather"), 1: (4, "side"), 2: (4, "gather"), 3: (4, "gather")}, []) == \
        " rank 1 is where no other rank is (most likely holding the others up);"
    assert _suspects({0: (4, "send"), 1: (4, "recv")}, []) == ""  # two ranks, two places: no majority to go by
    assert _suspects({0: (4, "a")}, [1]) == " rank 1 is not answering;"
