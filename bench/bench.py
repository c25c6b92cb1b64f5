"""mailedge vs Postfix, side by side: the relay benchmark of issue 6.

Theory of operation
-------------------
Everything runs on 127.0.0.1 inside one temp directory, and every process this script
starts is stopped by its own PID (or, for Postfix, with `postfix -c DIR stop`):

* an LMTP sink: Postfix's `smtp-sink -L -c`, which answers every recipient with 250
  and writes a running counter ("mesg=N") to its stdout, which goes to a file we read;
* a private Postfix instance (`postfix -c DIR`, never the system one) with its own
  main.cf/master.cf and queue in the temp dir: smtpd on a free port, `bench.example`
  relayed to `lmtp:[127.0.0.1]:SINK` through transport_maps, each recipient checked
  against relay_recipient_maps (a catch-all `@bench.example` entry), fsync as always;
* a mailedge node (`.venv/bin/mailedge run`) with config/bench/mailedge.toml copied
  into the temp dir and its ports and paths rewritten: the same domain, the same
  catch-all recipient lookup, LMTP to the same sink, fsync on;
* Postfix's `smtp-source` as the load generator for both.

The servers are pinned to CPU 0 and the tools (smtp-source, smtp-sink, our latency
client) to CPU 1 with `taskset`, so each server gets one core (mailedge has one worker
process today; `--workers` is part of issue 6). Each case runs on both systems,
alternating which goes first, for N rounds. A run is: smtp-source sends M messages;
then we wait until the sink has received exactly M more messages (the ones that got
250; smtp-source stops at the first error), and a short grace period shows no extra.
Elapsed time is from the first connection to the last message in the sink, so a
server that acknowledges faster than it delivers is not credited for it.

CPU per message is the growth of utime+stime (plus the reaped children's cutime and
cstime) over the server's whole process tree, read from /proc/<pid>/stat: for Postfix
the master and every daemon under it, for mailedge its process. Peak RSS is the
largest PSS (proportional set size) of that tree, sampled every 0.2 s during the
run; PSS rather than an RSS sum, which would charge Postfix's shared libraries once
per daemon. The bench process itself (sink polling, sampling) is pinned to CPU 1.

Latency (time from MAIL FROM to the 250 after the final dot, on open connections) is
measured by a small asyncio SMTP client of our own at a fixed rate, since smtp-source
does not report it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SERVER_CPU = "0"
TOOL_CPU = "1"
DOMAIN = "bench.example"


# ---------------------------------------------------------------------------- /proc


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds incl. reaped children) for every readable process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(b")") + 2:].split()
        ppid = int(fields[1])
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        table[int(entry.name)] = (ppid, ticks / CLK_TCK)
    return table


def _tree(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and everything under it (live or reaped)."""
    table = _proc_table()
    return sum(table[pid][1] for pid in _tree(root, table))


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of a process tree: shared pages are divided among the
    processes sharing them, so Postfix's many daemons are not charged for the same
    libraries once per process (a plain RSS sum would)."""
    total = 0
    for pid in _tree(root, _proc_table()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the PSS of a process tree in a thread; `peak` is the largest sum seen."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_bytes(self.root))


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def pinned(cpu: str, argv: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if pin else argv


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------- the sink


class LmtpSink:
    """Postfix's smtp-sink in LMTP mode; counts the messages it received."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        self._out_file = self.out.open("wb")
        argv = ["smtp-sink", "-u", "nobody", "-L", "-c", f"127.0.0.1:{self.port}", "1024"]
        self._err_file = (workdir / "sink.err").open("wb")
        self.proc = subprocess.Popen(pinned(TOOL_CPU, argv, pin), stdout=self._out_file,
                                     stderr=self._err_file)
        wait_port(self.port)

    def count(self) -> int:
        with self.out.open("rb") as f:
            f.seek(max(0, self.out.stat().st_size - 200))
            tail = f.read()
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        stop_pid(self.proc)
        self._out_file.close()
        self._err_file.close()


# ---------------------------------------------------------------------------- servers

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.{domain}
mydomain = {domain}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {domain}
# Every recipient is looked up, like mailedge's catch-all: "@domain" matches any.
relay_recipient_maps = texthash:{d}/relay_recipients
transport_maps = texthash:{d}/transport
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
message_size_limit = 36700160
# Room for c=100 sessions plus the delivery agents (default 100).
default_process_limit = 300
smtputf8_enable = no
biff = no
append_dot_mydomain = no
"""


class Server:
    name: str
    port: int
    root_pid: int

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.root_pid)

    def stop(self) -> None:
        raise NotImplementedError


class PostfixInstance(Server):
    """A private Postfix (`postfix -c DIR`) relaying bench.example to the LMTP sink."""

    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, pin: bool) -> None:
        self.dir = workdir / "postfix"
        self.dir.mkdir()
        for sub in ("queue", "data"):
            (self.dir / sub).mkdir()
            shutil.chown(self.dir / sub, "postfix")
        self.port = free_port()
        d = str(self.dir)
        (self.dir / "main.cf").write_text(MAIN_CF.format(d=d, domain=DOMAIN))
        (self.dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.dir / "relay_recipients").write_text(f"@{DOMAIN} OK\n")
        (self.dir / "transport").write_text(f"{DOMAIN} lmtp:[127.0.0.1]:{sink_port}\n")
        self._postfix("check")
        self._postfix("start", pin=pin)
        wait_port(self.port)
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        self.root_pid = int(pid_file.read_text().split()[0])

    def _postfix(self, command: str, pin: bool = False) -> None:
        argv = pinned(SERVER_CPU, ["postfix", "-c", str(self.dir), command], pin)
        subprocess.run(argv, check=True, timeout=60)

    def stop(self) -> None:
        self._postfix("stop")


def rewrite_toml(text: str, values: dict[tuple[str, str], str]) -> str:
    """Replace `key = ...` lines inside `[table]` sections (one-line values only)."""
    out, table, seen = [], "", set()
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            table = header.group(1)
        key = re.match(r"^([A-Za-z_]+)\s*=", line)
        if key and (table, key.group(1)) in values:
            line = f"{key.group(1)} = {values[(table, key.group(1))]}"
            seen.add((table, key.group(1)))
        out.append(line)
    missing = set(values) - seen
    if missing:
        raise ValueError(f"config/bench/mailedge.toml lacks {sorted(missing)}")
    return "\n".join(out) + "\n"


class MailedgeNode(Server):
    """`mailedge run` with config/bench/mailedge.toml, ports and paths rewritten."""

    name = "mailedge"

    def __init__(self, workdir: Path, sink_port: int, pin: bool, log_level: str) -> None:
        self.dir = workdir / "mailedge"
        self.dir.mkdir()
        self.port, self.admin_port = free_port(), free_port()
        tenants = self.dir / "tenants.toml"
        shutil.copy(REPO / "config/bench/tenants.toml", tenants)
        config = self.dir / "mailedge.toml"
        config.write_text(rewrite_toml((REPO / "config/bench/mailedge.toml").read_text(), {
            ("node", "spool_dir"): json.dumps(str(self.dir / "spool")),
            ("node", "log_level"): json.dumps(log_level),
            ("inbound", "listen"): json.dumps([f"127.0.0.1:{self.port}"]),
            ("tenants", "file"): json.dumps(str(tenants)),
            ("storage", "lmtp"): json.dumps(f"127.0.0.1:{sink_port}"),
            ("admin", "listen"): json.dumps(f"127.0.0.1:{self.admin_port}"),
        }))
        argv = [str(REPO / ".venv/bin/mailedge"), "run", "--config", str(config)]
        self.log = self.dir / "mailedge.log"
        self.proc = subprocess.Popen(pinned(SERVER_CPU, argv, pin), cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        try:
            wait_port(self.port)
        except RuntimeError:
            stop_pid(self.proc)
            sys.stderr.write(self.log.read_text()[-3000:])
            raise
        self.root_pid = self.proc.pid

    def accepted(self) -> int:
        """mailedge_messages_accepted_total summed over its labels (the 250s it sent)."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("mailedge_messages_accepted_total")))

    def stop(self) -> None:
        stop_pid(self.proc, timeout=20)


# ---------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    size: int  # message body bytes (smtp-source -l)
    sessions: int  # concurrent sessions (-s)
    recipients: int  # per message (-r)
    keepalive: bool  # many messages per connection (-d) or one
    messages: int

    @property
    def label(self) -> str:
        size = f"{self.size // 1024} KB"
        conn = "many/conn" if self.keepalive else "1/conn"
        return f"{size} c={self.sessions} r={self.recipients} {conn}"


def short_cases(scale: float) -> list[Case]:
    n = lambda base: max(100, int(base * scale))  # noqa: E731
    return [
        Case(1024, 20, 1, True, n(2000)),
        Case(51200, 20, 1, True, n(1500)),
        Case(1024, 100, 1, False, n(2000)),
        Case(1024, 20, 5, True, n(1500)),
        Case(51200, 100, 1, False, n(1500)),
    ]


def full_cases(scale: float) -> list[Case]:
    cases = []
    for size in (1024, 51200):
        for sessions in (20, 100):
            for recipients in (1, 5):
                for keepalive in (True, False):
                    base = 3000 if size == 1024 else 2000
                    cases.append(Case(size, sessions, recipients, keepalive,
                                      max(100, int(base * scale))))
    return cases


@dataclasses.dataclass
class RunResult:
    system: str
    case: str
    round: int
    messages: int
    seconds: float
    accept_seconds: float
    cpu_ms_per_msg: float
    peak_pss_mb: float
    loadavg: str
    ok: bool
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def smtp_source_argv(case: Case, port: int, pin: bool) -> list[str]:
    argv = ["smtp-source", "-s", str(case.sessions), "-m", str(case.messages),
            "-l", str(case.size), "-r", str(case.recipients), "-N",
            "-f", "sender@client.example", "-t", f"rcpt@{DOMAIN}", "-M", "client.example"]
    if case.keepalive:
        argv.append("-d")
    return pinned(TOOL_CPU, [*argv, f"127.0.0.1:{port}"], pin)


def run_once(server: Server, sink: LmtpSink, case: Case, round_no: int, pin: bool,
             timeout: float) -> RunResult:
    """One run of `case` against `server`; checks the sink got exactly the 250s."""
    note = ""
    sink_before = sink.count()
    accepted_before = server.accepted() if isinstance(server, MailedgeNode) else 0
    cpu_before = server.cpu_seconds()
    load = loadavg()
    with RssSampler(server.root_pid) as rss:
        start = time.monotonic()
        done = subprocess.run(smtp_source_argv(case, server.port, pin), capture_output=True,
                              timeout=timeout)
        accept_seconds = time.monotonic() - start
        expected = case.messages
        if done.returncode != 0 or done.stderr.strip():
            note = f"smtp-source rc={done.returncode}: {done.stderr.decode()[-300:].strip()}"
        deadline = time.monotonic() + timeout
        while sink.count() - sink_before < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        seconds = time.monotonic() - start
        cpu = server.cpu_seconds() - cpu_before
    time.sleep(0.3)  # anything beyond the expected count shows up here
    received = sink.count() - sink_before
    ok = received == expected and not note
    if isinstance(server, MailedgeNode):
        acked = server.accepted() - accepted_before
        if acked != expected:
            ok = False
            note += f" mailedge counted {acked} accepted;"
    if received != expected:
        note += f" sink received {received}, expected {expected};"
    return RunResult(server.name, case.label, round_no, received, seconds, accept_seconds,
                     cpu * 1000 / max(received, 1), rss.peak / 2**20, load, ok, note.strip())


# ---------------------------------------------------------------------------- latency


async def _latency_session(port: int, interval: float, count: int, size: int,
                           samples: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        while True:
            line = (await reader.readline()).decode()
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != "-":
                return line

    body = (b"From: sender@client.example\r\nTo: rcpt@bench.example\r\n"
            b"Subject: latency\r\n\r\n" + b"x" * 78 + b"\r\n") * max(1, size // 80)
    await reply()
    writer.write(b"EHLO client.example\r\n")
    await reply()
    next_at = time.monotonic()
    for i in range(count):
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        t0 = time.monotonic()
        for command in (b"MAIL FROM:<sender@client.example>",
                        f"RCPT TO:<l{i}@{DOMAIN}>".encode(), b"DATA"):
            writer.write(command + b"\r\n")
            line = await reply()
            if line[0] not in "23":
                errors.append(line.strip())
                writer.write(b"RSET\r\n")
                await reply()
                break
        else:
            writer.write(body + b".\r\n")
            line = await reply()
            if line.startswith("250"):
                samples.append(time.monotonic() - t0)
            else:
                errors.append(line.strip())
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def _latency(port: int, rate: float, seconds: float, sessions: int,
                   size: int) -> tuple[list[float], list[str]]:
    samples: list[float] = []
    errors: list[str] = []
    per_session = max(1, int(rate * seconds / sessions))
    interval = sessions / rate
    tasks = []
    for _ in range(sessions):
        # Spread the sessions' sending times evenly over one interval.
        await asyncio.sleep(interval / sessions)
        tasks.append(asyncio.create_task(
            _latency_session(port, interval, per_session, size, samples, errors)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds * 3 + 30)
    return samples, errors


def latency_run(server: Server, sink: LmtpSink, rate: float, seconds: float) -> dict[str, object]:
    """p50/p99 of MAIL FROM → 250 at a fixed rate of 1 KB messages, 10 sessions."""
    sink_before = sink.count()
    samples, errors = asyncio.run(_latency(server.port, rate, seconds, 10, 1024))
    deadline = time.monotonic() + 60
    while sink.count() - sink_before < len(samples) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    received = sink.count() - sink_before
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * len(samples)))] * 1000 if samples else 0.0

    return {"system": server.name, "rate": rate, "messages": len(samples),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "errors": len(errors), "ok": received == len(samples) and not errors,
            "sink_received": received, "loadavg": loadavg()}


# ---------------------------------------------------------------------------- profile


def start_py_spy(pid: int, out: Path, pin: bool) -> subprocess.Popen[bytes]:
    argv = [str(REPO / ".venv/bin/py-spy"), "record", "--pid", str(pid), "--rate", "200",
            "--format", "raw", "--output", str(out), "--nonblocking", "--gil"]
    return subprocess.Popen(pinned(TOOL_CPU, argv, pin), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _frame_name(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'module.py:func'."""
    match = re.match(r"(.*) \((?:.*/)?([^/]+?)(?::\d+)?\)$", frame)
    return f"{match.group(2)}:{match.group(1)}" if match else frame


def profile_summary(path: Path, top: int = 15) -> Iterator[str]:
    """Self and inclusive shares of CPU samples from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # drop the thread name
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
    yield (f"py-spy --gil: {total} samples of mailedge (only the thread holding the GIL: "
           "Python CPU, not fsync waits)")
    yield "| self % | function |"
    yield "|---|---|"
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        yield f"| {100 * count / total:.1f} | `{name}` |"
    yield ""
    yield "| inclusive % | function |"
    yield "|---|---|"
    for name, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 2]:
        yield f"| {100 * count / total:.1f} | `{name}` |"


# ---------------------------------------------------------------------------- report


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f} to {max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def report(cases: list[Case], results: list[RunResult]) -> Iterator[str]:
    yield ("| case | system | runs | messages | seconds (median) | msg/s (median) "
           "| CPU ms/msg (median) | peak PSS MB | checks |")
    yield "|---|---|---|---|---|---|---|---|---|"
    ratios: dict[str, list[float]] = {}
    for case in cases:
        for system in ("postfix", "mailedge"):
            runs = [r for r in results if r.case == case.label and r.system == system]
            if not runs:
                continue
            ok = sum(r.ok for r in runs)
            yield (f"| {case.label} | {system} | {len(runs)} | {runs[0].messages} "
                   f"| {statistics.median(r.seconds for r in runs):.2f} "
                   f"| {statistics.median(r.rate for r in runs):.0f} "
                   f"| {statistics.median(r.cpu_ms_per_msg for r in runs):.2f} "
                   f"| {max(r.peak_pss_mb for r in runs):.0f} | {ok}/{len(runs)} ok |")
        by_round: dict[int, dict[str, float]] = {}
        for r in results:
            if r.case == case.label:
                by_round.setdefault(r.round, {})[r.system] = r.rate
        ratios[case.label] = [v["mailedge"] / v["postfix"] for v in by_round.values()
                              if v.get("postfix") and "mailedge" in v]
    yield ""
    yield "| case | mailedge/Postfix msg/s (median) | spread over rounds |"
    yield "|---|---|---|"
    for label, values in ratios.items():
        median = f"{statistics.median(values):.2f}" if values else "-"
        yield f"| {label} | {median} | {spread(values)} |"


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole case matrix")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per case (default 3)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the messages per run (default 1.0)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one run may take before it fails")
    parser.add_argument("--latency-rate", type=float, default=100.0,
                        help="msg/s of the fixed-rate latency run (0: skip it)")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--log-level", default="info", help="mailedge's [node] log_level")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", type=Path, help="write every run's result here")
    parser.add_argument("--py-spy", type=Path, dest="py_spy",
                        help="record mailedge with py-spy (collapsed stacks) into this file "
                             "and print where its CPU goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    rounds = args.rounds or 3
    cases = full_cases(args.scale) if args.full else short_cases(args.scale)
    for tool in ("postfix", "smtp-source", "smtp-sink") + (("taskset",) if pin else ()):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (bench/run.sh installs it)", file=sys.stderr)
            return 2

    # `timeout` or a kill sends SIGTERM: unwind so `finally` stops what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if pin:
        os.sched_setaffinity(0, {int(TOOL_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="mailedge-bench-"))
    os.chmod(workdir, 0o755)  # Postfix daemons run as the postfix user
    print(f"bench: workdir {workdir}; {os.cpu_count()} CPUs; loadavg {loadavg()}; "
          f"pinning {'servers to CPU 0, tools to CPU 1' if pin else 'off'}", flush=True)
    results: list[RunResult] = []
    latencies: list[dict[str, object]] = []
    started: list[Server] = []
    profiler: subprocess.Popen[bytes] | None = None
    sink = LmtpSink(workdir, pin)
    try:
        postfix = PostfixInstance(workdir, sink.port, pin)
        started.append(postfix)
        mailedge = MailedgeNode(workdir, sink.port, pin, args.log_level)
        started.append(mailedge)
        servers: list[Server] = [postfix, mailedge]
        if args.py_spy:
            profiler = start_py_spy(mailedge.root_pid, args.py_spy, pin)
        warmup = Case(1024, 20, 1, True, 300)
        for server in servers:
            r = run_once(server, sink, warmup, 0, pin, args.timeout)
            print(f"bench: warm-up {server.name}: {r.rate:.0f} msg/s ok={r.ok} {r.note}",
                  flush=True)
        for round_no in range(1, rounds + 1):
            for case in cases:
                order = servers if round_no % 2 else servers[::-1]
                for server in order:
                    r = run_once(server, sink, case, round_no, pin, args.timeout)
                    results.append(r)
                    print(f"round {round_no} {case.label:28} {server.name:8} "
                          f"{r.messages:6d} msgs {r.seconds:6.2f} s {r.rate:7.0f} msg/s "
                          f"{r.cpu_ms_per_msg:5.2f} ms CPU/msg {r.peak_pss_mb:5.0f} MB "
                          f"load {r.loadavg} {'ok' if r.ok else 'FAILED ' + r.note}",
                          flush=True)
        if args.latency_rate > 0:
            for server in servers:
                lat = latency_run(server, sink, args.latency_rate, args.latency_seconds)
                latencies.append(lat)
                print(f"latency {server.name:8} at {lat['rate']:.0f} msg/s: "
                      f"p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms "
                      f"max {lat['max_ms']:.1f} ms ({lat['messages']} msgs, "
                      f"ok={lat['ok']})", flush=True)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                stop_pid(profiler)
        for server in reversed(started):
            server.stop()
        sink.stop()
        if args.keep:
            print(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    for line in report(cases, results):
        print(line)
    if latencies:
        print()
        print("| system | fixed rate msg/s | messages | p50 ms | p99 ms | max ms | ok |")
        print("|---|---|---|---|---|---|---|")
        for lat in latencies:
            print(f"| {lat['system']} | {lat['rate']:.0f} | {lat['messages']} "
                  f"| {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['max_ms']:.1f} "
                  f"| {lat['ok']} |")
    print(f"\nloadavg at end: {loadavg()}")
    if args.py_spy and args.py_spy.exists():
        print()
        for line in profile_summary(args.py_spy):
            print(line)
    if args.json:
        args.json.write_text(json.dumps({
            "runs": [dataclasses.asdict(r) | {"rate": r.rate} for r in results],
            "latency": latencies}, indent=2))
    failed = [r for r in results if not r.ok] + [x for x in latencies if not x["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
