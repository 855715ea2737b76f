"""Preemption: a signal asks the run to stop after the current optimizer step, with a checkpoint.

SIGTERM (what SLURM and Kubernetes send before the kill), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
``--signal``) are caught; the loop asks ``StopRequest.check`` after every optimizer step. All
ranks agree on the first signal seen by any rank (one small all-reduce per step), so they stop
at the same step: the trainer then saves a checkpoint, writes ``summary.json`` with
``"stopped": "<SIGNAL>"`` and exits with ``EXIT_STOPPED``. A rank whose launcher died (its parent
process changed, or the ``deepspeed`` runner above its per-node launcher is gone) stops the same
way with ``"stopped": "launcher_gone"``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
REASONS = (None, *SIGNALS, "launcher_gone")  # position = the code all-reduced between ranks
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; rerun with --resume
# Tests: "STEP:SIGNAL[:RANK]" makes the process (of that rank only, when given) send itself
# SIGNAL right after optimizer step STEP.
SIGNAL_AT_STEP_ENV = "HILT_SCALE_SIGNAL_AT_STEP"


class StopRequest:
    """Catches the stop signals (``install``) and says, after each step, whether to stop (``check``)."""

    def __init__(self) -> None:
        self.seen: str | None = None
        self.parent = os.getppid()
        self.launchers = _launchers(self.parent)
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.seen is None:
            self.seen = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for name in SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def check(self, step: int) -> str | None:
        """Collective: the stop reason agreed by all ranks after ``step`` (None: keep training)."""
        import torch
        import torch.distributed as dist

        want = os.environ.get(SIGNAL_AT_STEP_ENV, "").split(":")
        if want[0] == str(step) and (len(want) < 3 or want[2] == os.environ.get("RANK", "0")):
            os.kill(os.getpid(), getattr(signal, want[1] if len(want) > 1 else "SIGTERM"))
        reason = self.seen
        if reason is None and (os.getppid() != self.parent or not all(map(_alive, self.launchers))):
            reason = "launcher_gone"
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return reason
        code = torch.tensor([REASONS.index(reason)], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return REASONS[int(code.item())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _launchers(parent: int) -> list[int]:
    """The ``deepspeed`` runner above a ``deepspeed.launcher.launch`` parent (SIGTERM to the runner
    leaves that per-node launcher and its ranks running): watched besides the parent itself."""
    try:
        if b"deepspeed.launcher.launch" not in Path(f"/proc/{parent}/cmdline").read_bytes():
            return []
        grandparent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return []
    return [grandparent] if grandparent > 1 else []


def leave(reason: str, out: Any, step: int, rank: int, tag: str | None) -> None:
    """After the stop checkpoint: rank 0 writes ``summary.json`` saying why and where the run
    stopped; all ranks leave the process group together and exit with ``EXIT_STOPPED``."""
    from pathlib import Path

    import torch.distributed as dist

    from shards.io import write_json_atomic

    if rank == 0:
        summary = {"stopped": reason, "steps": step, "checkpoint": tag, "resume": "rerun with --resume"}
        write_json_atomic(Path(out) / "summary.json", summary)
        print(f"stopped by {reason} after step {step}: checkpoint {tag} saved; rerun with --resume")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    raise SystemExit(EXIT_STOPPED)
