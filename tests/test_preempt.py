"""Preemption signals (issue 23): each stop signal is caught and reported after the step; the
handlers before ``install`` come back with ``restore``."""

import os
import signal

import pytest

from hilt_scale.training.preempt import SIGNAL_AT_STEP_ENV, StopRequest


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_is_caught_and_reported_after_the_step(name):
    before = signal.getsignal(getattr(signal, name))
    stop = StopRequest().install()
    try:
        assert stop.check(1) is None
        os.kill(os.getpid(), getattr(signal, name))  # without the handler this would end pytest
        assert stop.check(2) == name
    finally:
        stop.restore()
    assert signal.getsignal(getattr(signal, name)) == before


def test_the_first_signal_wins_and_the_test_hook_signals_after_its_step(monkeypatch):
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "3:SIGUSR1")
    stop = StopRequest().install()
    try:
        assert stop.check(2) is None
        assert stop.check(3) == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.check(4) == "SIGUSR1"
    finally:
        stop.restore()


def test_a_rank_whose_launcher_died_stops():
    stop = StopRequest()
    stop.parent = -1  # not our parent: as after the launcher died and the rank was re-parented
    assert stop.check(1) == "launcher_gone"
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stop = StopRequest()
    assert stop.check(1) is None
    stop.launchers = [gone.pid]  # the deepspeed runner above the per-node launcher has exited
    assert stop.check(2) == "launcher_gone"


def test_a_start_up_stuck_on_the_comm_op_lock_names_the_lock_file(monkeypatch, tmp_path):
    """Minor case: a run killed while DeepSpeed built its CPU comm op left a lock file, and every
    later run slept forever with no output; after a minute the run now names the file to remove."""
    from hilt_scale.training.distributed import comm_op_hint

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    text = comm_op_hint(60)
    assert str(tmp_path) in text and "deepspeed_shm_comm" in text and "/lock" in text and "rm " in text
