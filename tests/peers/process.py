"""Process bookkeeping for the test peers (sessions of processes: NSD, rspamd; single
processes: clamd, Redis; Dovecot's master and services).

A peer is started with `start_new_session=True`, so every process it forks belongs to
the session its first process leads. Each process is named by (pid, start time), so a
reused pid is never mistaken for ours, and nothing is ever found or stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs (zombies do not)."""
    st = proc_stat(pid)
    return st is not None and st[3] == start and st[0] != "Z"


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def session_members(leader: int, leader_start: int) -> dict[int, int]:
    """PID -> start time of the live processes in the session `leader` created."""
    members: dict[int, int] = {}
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[2] == leader and st[3] >= leader_start and st[0] != "Z":
            members[pid] = st[3]
    return members


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM (if still running), `grace` seconds to exit, then SIGKILL; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def kill_all(processes: dict[int, int]) -> list[int]:
    """SIGKILL the live ones of (pid -> start time) and wait for them; the survivors."""
    leftovers = {p: s for p, s in processes.items() if alive(p, s)}
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while leftovers and time.monotonic() < deadline:
        leftovers = {p: s for p, s in leftovers.items() if alive(p, s)}
        time.sleep(0.01)
    return sorted(leftovers)


def signal_session(leader: int, leader_start: int, sig: signal.Signals) -> None:
    """Send `sig` to every live process of the session (SIGSTOP/SIGCONT: freeze, thaw)."""
    for pid in session_members(leader, leader_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_session(proc: subprocess.Popen[bytes], start: int, grace: float) -> list[int]:
    """Stop a peer and every process of its session; the pids that survived SIGKILL.

    A frozen peer is thawed first (SIGCONT), the leader gets SIGTERM and `grace`
    seconds, then SIGKILL; the rest of the session (workers exit after the leader) gets
    the same grace before SIGKILL.
    """
    members = session_members(proc.pid, start)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    terminate(proc, grace)
    members.update(session_members(proc.pid, start))
    deadline = time.monotonic() + grace
    leftovers = {p: s for p, s in members.items() if alive(p, s)}
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.01)
        leftovers = {p: s for p, s in leftovers.items() if alive(p, s)}
    return kill_all(leftovers)
