"""Worker ownership of the spool, the supervisor's metric sums, the workers setting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Settings, StateSettings
from gateway.ownership import SLOTS, SlotOwnership, SpoolBusy, slot_of
from gateway.spool import QueueIdFactory, Spool
from gateway.workers import Supervisor, Worker, bind_listeners, default_worker_count

# -- queue ids and slots -----------------------------------------------------------------


@pytest.mark.parametrize(("queue_id", "slot"), [
    ("0633A6E2F1C40-1F2A-0001B.mx1", 0),
    ("0633A6E2F1C40-1F2A-0001B-w1.mx1", 1),
    ("0633A6E2F1C40-1F2A-0001B-w63.mx-7.b", 63),
    ("0633A6E2F1C40-1F2A-0001B-w64.mx1", 0),  # beyond the slots: wraps, still owned
    ("0633A6E2F1C40-1F2A-0001B-wx.mx1", 0),  # not a slot field
    ("0633A6E2F1C40-1F2A-0001B-w.mx1", 0),
    ("garbage", 0),
    ("", 0),
])
def test_slot_of(queue_id: str, slot: int) -> None:
    assert slot_of(queue_id) == slot


@given(st.integers(0, SLOTS - 1), st.from_regex(r"[a-z0-9][a-z0-9-]{0,30}", fullmatch=True))
def test_factory_ids_name_their_slot(slot: int, node: str) -> None:
    queue_id = QueueIdFactory(node, slot=slot).new()
    assert slot_of(queue_id) == slot
    assert queue_id.endswith("." + node)


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 64])
def test_every_slot_has_exactly_one_owner(tmp_path: Path, workers: int) -> None:
    owners = [SlotOwnership(tmp_path, k, workers) for k in range(workers)]
    for slot in range(SLOTS):
        queue_id = f"0633A6E2F1C40-1F2A-0001B-w{slot}.mx1"
        assert sum(o.owns(queue_id) for o in owners) == 1


def test_bad_worker_numbers(tmp_path: Path) -> None:
    for worker, workers in [(0, 0), (2, 2), (-1, 2), (0, SLOTS + 1)]:
        with pytest.raises(ValueError):
            SlotOwnership(tmp_path, worker, workers)


# POSIX record locks belong to a process: the other holder must be another process.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gateway.ownership import SlotOwnership
    owner = SlotOwnership(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    owner.acquire(0.1)
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
""")


def hold(root: Path, worker: int, workers: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(worker),
                             str(workers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_slots_lock_across_processes(tmp_path: Path) -> None:
    worker1 = hold(tmp_path, 1, 2)
    try:
        other_half = SlotOwnership(tmp_path, 0, 2)
        other_half.acquire(0.1)  # the other half is free
        other_half.release()
        with pytest.raises(SpoolBusy, match="slot 1"):
            SlotOwnership(tmp_path, 1, 2).acquire(0.2)  # a second worker 1
        with pytest.raises(SpoolBusy):
            SlotOwnership(tmp_path).acquire(0.2)  # a whole node on a busy spool
    finally:
        release(worker1)
    whole = SlotOwnership(tmp_path)
    whole.acquire(1.0)  # the holder is gone: the kernel released its slots
    whole.release()


def test_successor_waits_for_a_dying_holder(tmp_path: Path) -> None:
    worker1 = hold(tmp_path, 1, 2)
    successor = SlotOwnership(tmp_path, 1, 2)
    threading.Timer(0.3, release, (worker1,)).start()
    successor.acquire(10.0)  # waits until the holder exits, then owns the slot
    successor.release()


def test_spool_recovery_sees_only_owned_messages(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).close()
    queue = root / "queue"
    ids = {slot: QueueIdFactory("mx1", slot=slot).new() for slot in range(4)}
    for queue_id in ids.values():
        (queue / f"{queue_id}.msg").write_bytes(b"x")
        (root / "tmp" / queue_id).write_bytes(b"half")
    orphan_state = QueueIdFactory("mx1", slot=3).new()
    (queue / f"{orphan_state}.state").write_bytes(b"")
    mine = Spool(root, owner=SlotOwnership(root, 1, 2))  # slots 1 and 3
    assert list(mine.queued_ids()) == sorted([ids[1], ids[3]])
    # It cleaned only its own leftovers.
    assert sorted(p.name for p in (root / "tmp").iterdir()) == sorted([ids[0], ids[2]])
    assert not (queue / f"{orphan_state}.state").exists()
    mine.close()
    everything = Spool(root)  # tools without an owner see all
    assert list(everything.queued_ids(clean=False)) == sorted(ids.values())
    everything.close()


# -- the supervisor's metrics ------------------------------------------------------------

WORKER_0 = """\
# HELP mailedge_messages_accepted_total Message copies accepted
# TYPE mailedge_messages_accepted_total counter
mailedge_messages_accepted_total{tenant="acme"} 3.0
# HELP mailedge_active_sessions Open SMTP sessions
# TYPE mailedge_active_sessions gauge
mailedge_active_sessions 2.0
# HELP mailedge_state_degraded 1 while Redis is unreachable
# TYPE mailedge_state_degraded gauge
mailedge_state_degraded 0.0
# HELP mailedge_spool_commit_seconds Time to durable spool
# TYPE mailedge_spool_commit_seconds histogram
mailedge_spool_commit_seconds_bucket{le="0.001"} 1.0
mailedge_spool_commit_seconds_bucket{le="0.01"} 3.0
mailedge_spool_commit_seconds_bucket{le="+Inf"} 3.0
mailedge_spool_commit_seconds_count 3.0
mailedge_spool_commit_seconds_sum 0.012
"""
WORKER_1 = """\
# HELP mailedge_messages_accepted_total Message copies accepted
# TYPE mailedge_messages_accepted_total counter
mailedge_messages_accepted_total{tenant="acme"} 4.0
mailedge_messages_accepted_total{tenant="globex"} 1.0
# HELP mailedge_active_sessions Open SMTP sessions
# TYPE mailedge_active_sessions gauge
mailedge_active_sessions 5.0
# HELP mailedge_state_degraded 1 while Redis is unreachable
# TYPE mailedge_state_degraded gauge
mailedge_state_degraded 1.0
# HELP mailedge_spool_commit_seconds Time to durable spool
# TYPE mailedge_spool_commit_seconds histogram
mailedge_spool_commit_seconds_bucket{le="0.001"} 0.0
mailedge_spool_commit_seconds_bucket{le="0.01"} 2.0
mailedge_spool_commit_seconds_bucket{le="+Inf"} 2.0
mailedge_spool_commit_seconds_count 2.0
mailedge_spool_commit_seconds_sum 0.008
"""


def feed(supervisor: Supervisor, worker: Worker, text: str) -> None:
    """What Supervisor._scrape stores, from exposition text instead of a socket."""
    samples = {}
    for family in text_string_to_metric_families(text):
        supervisor._families.setdefault(family.name, (family.type, family.documentation))
        for sample in family.samples:
            samples[(family.name, sample.name, tuple(sorted(sample.labels.items())))] = \
                sample.value
    worker.last_samples = samples


def rendered(supervisor: Supervisor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = supervisor.render_metrics().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def supervisor(tmp_path: Path) -> Supervisor:
    settings = Settings(tmp_path / "mailedge.toml")
    settings = dataclasses.replace(settings, node=dataclasses.replace(
        settings.node, spool_dir=tmp_path))
    sup = Supervisor(tmp_path / "mailedge.toml", settings, 2)
    sup.workers = [Worker(i, [], tmp_path / f"w{i}.sock") for i in range(2)]
    return sup


def test_metrics_add_up_across_workers(supervisor: Supervisor) -> None:
    feed(supervisor, supervisor.workers[0], WORKER_0)
    feed(supervisor, supervisor.workers[1], WORKER_1)
    out = rendered(supervisor)
    assert out[("mailedge_messages_accepted_total", (("tenant", "acme"),))] == 7
    assert out[("mailedge_messages_accepted_total", (("tenant", "globex"),))] == 1
    assert out[("mailedge_active_sessions", ())] == 7
    assert out[("mailedge_state_degraded", ())] == 1  # the worst worker, not a sum
    assert out[("mailedge_spool_commit_seconds_bucket", (("le", "0.01"),))] == 5
    assert out[("mailedge_spool_commit_seconds_count", ())] == 5
    assert out[("mailedge_spool_commit_seconds_sum", ())] == pytest.approx(0.02)
    assert out[("mailedge_workers", ())] == 0  # no process started in this test
    assert out[("mailedge_worker_restarts_total", ())] == 0


def test_a_dead_workers_counters_stay_in_the_totals(supervisor: Supervisor) -> None:
    feed(supervisor, supervisor.workers[0], WORKER_0)
    feed(supervisor, supervisor.workers[1], WORKER_1)
    supervisor._retire(supervisor.workers[1])  # what _spawn does for a successor
    feed(supervisor, supervisor.workers[1], WORKER_0)  # the successor's first counts
    out = rendered(supervisor)
    assert out[("mailedge_messages_accepted_total", (("tenant", "acme"),))] == 3 + 4 + 3
    assert out[("mailedge_messages_accepted_total", (("tenant", "globex"),))] == 1
    assert out[("mailedge_spool_commit_seconds_count", ())] == 3 + 2 + 3
    # Gauges describe the present: the dead worker's sessions are gone with it.
    assert out[("mailedge_active_sessions", ())] == 4
    assert out[("mailedge_state_degraded", ())] == 0


# -- listeners and the workers setting ---------------------------------------------------


def test_listeners_one_port_per_address_for_all_workers() -> None:
    from gateway.config import HostPort
    per_worker = bind_listeners((HostPort("127.0.0.1", 0),), 3)
    try:
        ports = {s.getsockname()[1] for socks in per_worker for s in socks}
        assert len(per_worker) == 3 and all(len(s) == 1 for s in per_worker)
        assert len(ports) == 1  # port 0: the first socket's port for all of them
    finally:
        for socks in per_worker:
            for sock in socks:
                sock.close()


def test_default_worker_count() -> None:
    import os
    plain = Settings(Path("mailedge.toml"))
    assert default_worker_count(plain) == 1
    shared = dataclasses.replace(plain, state=StateSettings(redis_url="redis://127.0.0.1"))
    assert default_worker_count(shared) == min(os.cpu_count() or 1, 64)
    fixed = dataclasses.replace(plain, node=dataclasses.replace(plain.node, workers=3))
    assert default_worker_count(fixed) == 3


@pytest.mark.parametrize("value", ["-1", "65", '"2"', "true"])
def test_workers_setting_refused(tmp_path: Path, value: str) -> None:
    from gateway.config import ConfigError, load_config
    (tmp_path / "tenants.toml").write_text("")
    config = tmp_path / "m.toml"
    config.write_text(f'[node]\nworkers = {value}\n[tenants]\nfile = "tenants.toml"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert "node.workers:" in refused.value.render()


@pytest.mark.parametrize("count", ["0", "65", "-2"])
def test_run_refuses_a_bad_worker_count(tmp_path: Path, count: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    (tmp_path / "tenants.toml").write_text("")
    config = tmp_path / "m.toml"
    config.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\n'
                      f'[tenants]\nfile = "{tmp_path / "tenants.toml"}"\n')
    assert main(["run", "--config", str(config), "--workers", count]) == 2
    assert "--workers must be 1 to 64" in capsys.readouterr().err
    assert not (tmp_path / "spool").exists()  # refused before anything was started
