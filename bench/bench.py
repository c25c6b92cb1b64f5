"""mailedge vs Postfix, side by side: the benchmark of issue 6.

Theory of operation
-------------------
Everything runs on 127.0.0.1 inside one temp directory (removed unless --keep), and
every process this script starts is stopped by its own PID (or, for Postfix, with
`postfix -c DIR stop`). The run has five parts; `--only PART` (repeatable) picks some:

* `dkim`: a micro-benchmark of gateway/dkim_signer.py in this process: RSA-2048 and
  Ed25519 signatures of a 2 KB and a 50 KB message, median and p99 wall ms per
  signature and CPU ms per signature (process time over the loop).
* `relay`: the plain relay (SMTP -> spool with fsync -> LMTP), the original cases.
  Load: Postfix's `smtp-source`. Then `latency`, which belongs to it: our own asyncio
  client sends 1 KB messages over 10 open connections at 50 % of each system's peak
  msg/s, the median msg/s of the "1 KB c=20 r=1 many/conn" case of the same run
  (`--latency-rate R` fixes the rate instead), and times MAIL FROM -> the 250 after the
  final dot (p50/p99/max; target p99 < 50 ms).
* `chain`: the full inbound chain (bench/chain.py: NSD, clamd, rspamd). mailedge runs
  config/bench/mailedge-chain.toml: SPF, DKIM, ARC and DMARC itself against NSD, clamd
  over its socket, rspamd /checkv2 with its SPF/DKIM/DMARC results as headers. Postfix
  runs with `smtpd_milters = inet:127.0.0.1:P`: the same rspamd's proxy worker in
  milter mode, which does SPF, DKIM, DMARC and ARC (rspamd's modules) and calls clamd
  (rspamd's antivirus module); Postfix itself checks none of these. Load: bench/loadgen.py
  `send` (smtp-source cannot send a file) sending a message DKIM-signed once per size,
  for both systems. CPU ms per message is reported for each system's OWN processes and,
  separately, for rspamd, clamd and NSD during that system's runs.
* `idle`: 10,000 (`--idle-sessions`) concurrent sessions to one mailedge node
  (bench/loadgen.py `idle`: greeting, EHLO, then nothing), then the greeting time of a
  few new clients (target < 1 s) and memory per idle session = (PSS of the node's
  process tree with the sessions - PSS before) / sessions (target < 30 KB). Postfix is
  tried with its default process limit (default_process_limit = 100 smtpd processes)
  and a bounded number of sessions (`--postfix-idle-sessions`, 1 s greeting timeout
  each): how many got a greeting within 1 s and whether a new client still does.
  RLIMIT_NOFILE is raised for the bench (inherited by the servers) and the client.

Shared by the relay and chain parts:

* an LMTP sink: Postfix's `smtp-sink -L -c -v`; `-c` writes a running message counter
  ("mesg=N", one per transaction, i.e. per "." whatever the recipient count) to its
  stdout, `-v` logs every command to its stderr, where we count "RCPT TO:" lines: the
  recipients. Both go to files we read.
* a private Postfix instance (`postfix -c DIR`, never the system one) with its own
  main.cf/master.cf and queue in the temp dir: smtpd on a free port, `bench.example`
  relayed to `lmtp:[127.0.0.1]:SINK` through transport_maps, each recipient checked
  against relay_recipient_maps (a `hash:` table, made with postmap, of every address
  the load sends), fsync as always;
* a mailedge node (`.venv/bin/mailedge run --config F --workers N`) with
  config/bench/mailedge.toml (or -chain.toml) copied into the temp dir and its ports
  and paths rewritten, and a generated tenants file: tenant `bench`, domain
  bench.example, one mailbox per address the load sends (1rcpt@ ... Nrcpt@, the
  numbering of smtp-source -N), no catch-all. So a message to r recipients is r
  recipient lookups and r LMTP recipients for both systems.

Pinning (`--pin`): `none` (default) runs both systems, the peers and the tools unpinned
on all cores, with `--workers` = number of cores for mailedge (the issue's "both workers
busy"); `one-core` pins the servers to CPU 0 with `taskset` and the tools, peers and
this process to CPU 1, with one mailedge worker. Each case runs on both systems,
alternating which goes first, for N rounds. A run: the load tool sends M messages; then
we wait until the sink has received exactly M more messages and M x r recipients (only
250s count; smtp-source stops at the first error), and a short grace period shows no
extra. Elapsed time is from the first connection to the last message in the sink, so a
server that acknowledges faster than it delivers is not credited for it.

CPU per message is the growth of utime+stime (plus the reaped children's cutime and
cstime) over the server's whole process tree, read from /proc/<pid>/stat: for Postfix
the master and every daemon under it, for mailedge the `mailedge run` supervisor and
its worker processes. Peak RSS is the largest PSS (proportional set size) of that tree,
sampled every 0.2 s during the run; PSS rather than an RSS sum, which would charge
Postfix's shared libraries once per daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import re
import resource
import select
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chain import ChainPeers

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SERVER_CPU = "0"
TOOL_CPU = "1"
DOMAIN = "bench.example"
RCPT_SUFFIX = f"rcpt@{DOMAIN}"  # smtp-source -N and loadgen.py prepend 1, 2, 3, ...
PYTHON = str(REPO / ".venv/bin/python")
LOADGEN = str(REPO / "bench/loadgen.py")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # gateway/ and tests/peers/ for bench/chain.py


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
    """Postfix's smtp-sink in LMTP mode; counts the messages and recipients it received."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        self.err = workdir / "sink.err"
        self._out_file = self.out.open("wb")
        self._err_file = self.err.open("wb")
        # -v logs each command (not the message lines) to stderr: "RCPT TO:" = recipients.
        argv = ["smtp-sink", "-u", "nobody", "-L", "-c", "-v", f"127.0.0.1:{self.port}", "1024"]
        self.proc = subprocess.Popen(pinned(TOOL_CPU, argv, pin), stdout=self._out_file,
                                     stderr=self._err_file)
        self._err_offset = 0
        self._rcpts = 0
        wait_port(self.port)

    def count(self) -> int:
        """Messages (transactions ended with ".") received so far."""
        with self.out.open("rb") as f:
            f.seek(max(0, self.out.stat().st_size - 200))
            tail = f.read()
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def recipients(self) -> int:
        """Recipients (RCPT TO commands) received so far."""
        with self.err.open("rb") as f:
            f.seek(self._err_offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1  # a line still being written waits for next time
        self._rcpts += data.count(b": RCPT TO:", 0, complete)
        self._err_offset += complete
        return self._rcpts

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
# Every recipient is looked up in a table of the mailboxes, as mailedge does.
relay_recipient_maps = hash:{d}/relay_recipients
transport_maps = texthash:{d}/transport
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
message_size_limit = 36700160
# Room for c=100 sessions plus the delivery agents (default 100); the idle case
# runs with the default.
default_process_limit = {process_limit}
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
    """A private Postfix (`postfix -c DIR`) relaying bench.example to the LMTP sink.

    `recipients` is the file of addresses (one a line) relay_recipient_maps accepts;
    `extra` is appended to main.cf (the chain case's milter settings)."""

    name = "postfix"

    def __init__(self, workdir: Path, dirname: str, sink_port: int, pin: bool,
                 recipients: Path, extra: str = "", process_limit: int = 300) -> None:
        self.dir = workdir / dirname
        self.dir.mkdir()
        for sub in ("queue", "data"):
            (self.dir / sub).mkdir()
            shutil.chown(self.dir / sub, "postfix")
        self.port = free_port()
        d = str(self.dir)
        (self.dir / "main.cf").write_text(
            MAIN_CF.format(d=d, domain=DOMAIN, process_limit=process_limit) + extra)
        (self.dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        with recipients.open() as src, (self.dir / "relay_recipients").open("w") as dst:
            for line in src:
                dst.write(f"{line.strip()} OK\n")
        subprocess.run(["postmap", "-c", d, f"hash:{d}/relay_recipients"], check=True,
                       timeout=120)
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


def rewrite_toml(text: str, values: dict[tuple[str, str], str],
                 source: str = "config/bench/mailedge.toml") -> str:
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
        raise ValueError(f"{source} lacks {sorted(missing)}")
    return "\n".join(out) + "\n"


def write_mailboxes(workdir: Path, count: int) -> tuple[Path, Path]:
    """The recipients the load sends (1rcpt@ ... countrcpt@, smtp-source -N numbering):
    a plain list (for Postfix's relay_recipient_maps) and a mailedge tenants file with
    one mailbox each (format: docs/tenants-file.md; no catch-all)."""
    addresses = [f"{n}{RCPT_SUFFIX}" for n in range(1, count + 1)]
    plain = workdir / "recipients.txt"
    plain.write_text("".join(a + "\n" for a in addresses))
    tenants = workdir / "tenants.toml"
    tenants.write_text(
        "# Generated by bench/bench.py: one mailbox per address the load sends.\n"
        "[tenant.bench]\n"
        'name = "Benchmark tenant"\n'
        f'domains = ["{DOMAIN}"]\n'
        "mailboxes = [\n"
        + "".join(f'  "{a}",\n' for a in [*addresses, f"postmaster@{DOMAIN}"])
        + "]\n")
    return plain, tenants


@functools.cache
def mailedge_has_workers_option() -> bool:
    """Does this mailedge's `run` take --workers (issue 6, being implemented)?"""
    done = subprocess.run([str(REPO / ".venv/bin/mailedge"), "run", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    return "--workers" in done.stdout


class MailedgeNode(Server):
    """`mailedge run` with a config/bench/ file, ports and paths rewritten."""

    name = "mailedge"

    def __init__(self, workdir: Path, dirname: str, sink_port: int, pin: bool,
                 log_level: str, workers: int, tenants: Path,
                 template: str = "config/bench/mailedge.toml",
                 values: dict[tuple[str, str], str] | None = None) -> None:
        self.dir = workdir / dirname
        self.dir.mkdir()
        self.port, self.admin_port = free_port(), free_port()
        config = self.dir / "mailedge.toml"
        config.write_text(rewrite_toml((REPO / template).read_text(), {
            ("node", "spool_dir"): json.dumps(str(self.dir / "spool")),
            ("node", "log_level"): json.dumps(log_level),
            ("inbound", "listen"): json.dumps([f"127.0.0.1:{self.port}"]),
            ("tenants", "file"): json.dumps(str(tenants)),
            ("storage", "lmtp"): json.dumps(f"127.0.0.1:{sink_port}"),
            ("admin", "listen"): json.dumps(f"127.0.0.1:{self.admin_port}"),
            **(values or {}),
        }, template))
        argv = [str(REPO / ".venv/bin/mailedge"), "run", "--config", str(config)]
        if mailedge_has_workers_option():
            argv += ["--workers", str(workers)]
        elif workers != 1:
            raise ValueError("mailedge run has no --workers option yet: use --workers 1")
        self.log = self.dir / "mailedge.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(pinned(SERVER_CPU, argv, pin), cwd=self.dir,
                                         stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_port(self.port)
            wait_port(self.admin_port)
        except RuntimeError:
            stop_pid(self.proc)
            sys.stderr.write(self.log.read_text()[-3000:])
            raise
        self.root_pid = self.proc.pid

    def metric(self, name: str) -> int:
        """A counter from /metrics summed over its labels."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(name) and not line.startswith("#")
                       and line[len(name):len(name) + 1] in ("{", " ")))

    def accepted(self) -> int:
        """mailedge_messages_accepted_total summed over its labels (the 250s it sent)."""
        return self.metric("mailedge_messages_accepted_total")

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


def _count(base: int, scale: float) -> int:
    return max(100, int(base * scale))


def short_cases(scale: float) -> list[Case]:
    return [
        Case(1024, 20, 1, True, _count(2000, scale)),
        Case(51200, 20, 1, True, _count(1500, scale)),
        Case(1024, 100, 1, False, _count(2000, scale)),
        Case(1024, 20, 5, True, _count(1500, scale)),
        Case(51200, 100, 1, False, _count(1500, scale)),
    ]


def full_cases(scale: float) -> list[Case]:
    cases = []
    for size in (1024, 51200):
        for sessions in (20, 100):
            for recipients in (1, 5):
                for keepalive in (True, False):
                    base = 3000 if size == 1024 else 2000
                    cases.append(Case(size, sessions, recipients, keepalive,
                                      _count(base, scale)))
    return cases


PEAK_CASE = "1 KB c=20 r=1 many/conn"  # the latency run goes at half of its msg/s
WARMUP = Case(1024, 20, 1, True, 300)


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
    recipients: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def smtp_source_argv(case: Case, port: int, pin: bool) -> list[str]:
    argv = ["smtp-source", "-s", str(case.sessions), "-m", str(case.messages),
            "-l", str(case.size), "-r", str(case.recipients), "-N",
            "-f", "sender@client.example", "-t", RCPT_SUFFIX, "-M", "client.example"]
    if case.keepalive:
        argv.append("-d")
    return pinned(TOOL_CPU, [*argv, f"127.0.0.1:{port}"], pin)


def wait_sink(sink: LmtpSink, msgs_before: int, rcpts_before: int, messages: int,
              recipients: int, timeout: float) -> None:
    """Until the sink has `messages` more messages and `recipients` more recipients."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (sink.count() - msgs_before >= messages
                and sink.recipients() - rcpts_before >= recipients):
            return
        time.sleep(0.01)


def sink_note(sink: LmtpSink, msgs_before: int, rcpts_before: int, messages: int,
              recipients: int) -> tuple[int, int, str]:
    """After the grace period: (messages, recipients) received, and what was wrong."""
    received = sink.count() - msgs_before
    rcpts = sink.recipients() - rcpts_before
    note = ""
    if received != messages:
        note += f" sink received {received} messages, expected {messages};"
    if rcpts != recipients:
        note += f" sink received {rcpts} recipients, expected {recipients};"
    return received, rcpts, note


def run_once(server: Server, sink: LmtpSink, case: Case, round_no: int, pin: bool,
             timeout: float) -> RunResult:
    """One run of `case` against `server`; checks the sink got exactly the 250s."""
    note = ""
    sink_before, rcpts_before = sink.count(), sink.recipients()
    accepted_before = server.accepted() if isinstance(server, MailedgeNode) else 0
    cpu_before = server.cpu_seconds()
    load = loadavg()
    expected = case.messages
    with RssSampler(server.root_pid) as rss:
        start = time.monotonic()
        done = subprocess.run(smtp_source_argv(case, server.port, pin), capture_output=True,
                              timeout=timeout)
        accept_seconds = time.monotonic() - start
        if done.returncode != 0 or done.stderr.strip():
            note = f"smtp-source rc={done.returncode}: {done.stderr.decode()[-300:].strip()}"
        wait_sink(sink, sink_before, rcpts_before, expected, expected * case.recipients,
                  timeout)
        seconds = time.monotonic() - start
        cpu = server.cpu_seconds() - cpu_before
    time.sleep(0.3)  # anything beyond the expected count shows up here
    received, rcpts, sink_problem = sink_note(sink, sink_before, rcpts_before, expected,
                                              expected * case.recipients)
    note += sink_problem
    if isinstance(server, MailedgeNode):
        acked = server.accepted() - accepted_before
        if acked != expected:
            note += f" mailedge counted {acked} accepted;"
    return RunResult(server.name, case.label, round_no, received, seconds, accept_seconds,
                     cpu * 1000 / max(received, 1), rss.peak / 2**20, load, not note,
                     note.strip(), rcpts)


# ---------------------------------------------------------------------------- latency


async def _latency_session(port: int, interval: float, count: int, size: int,
                           mailboxes: int, samples: list[float], errors: list[str]) -> None:
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
                        f"RCPT TO:<{i % mailboxes + 1}{RCPT_SUFFIX}>".encode(),
                        b"DATA"):
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
                   size: int, mailboxes: int) -> tuple[list[float], list[str]]:
    samples: list[float] = []
    errors: list[str] = []
    per_session = max(1, int(rate * seconds / sessions))
    interval = sessions / rate
    tasks = []
    for _ in range(sessions):
        # Spread the sessions' sending times evenly over one interval.
        await asyncio.sleep(interval / sessions)
        tasks.append(asyncio.create_task(
            _latency_session(port, interval, per_session, size, mailboxes, samples,
                             errors)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds * 3 + 30)
    return samples, errors


def latency_run(server: Server, sink: LmtpSink, rate: float, seconds: float,
                mailboxes: int, basis: str) -> dict[str, object]:
    """p50/p99 of MAIL FROM → 250 at a given rate of 1 KB messages, 10 sessions."""
    sink_before = sink.count()
    samples, errors = asyncio.run(_latency(server.port, rate, seconds, 10, 1024, mailboxes))
    deadline = time.monotonic() + 60
    while sink.count() - sink_before < len(samples) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    received = sink.count() - sink_before
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * len(samples)))] * 1000 if samples else 0.0

    return {"system": server.name, "rate": rate, "basis": basis, "messages": len(samples),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "errors": len(errors), "ok": received == len(samples) and not errors,
            "sink_received": received, "loadavg": loadavg()}


# ---------------------------------------------------------------------------- chain

MILTER_CF = """
# The chain case: rspamd's proxy worker in milter mode does SPF, DKIM, DMARC, ARC,
# spam scoring and (through its antivirus module) clamd for this Postfix.
smtpd_milters = inet:127.0.0.1:{port}
non_smtpd_milters =
milter_protocol = 6
milter_default_action = tempfail
milter_mail_macros = i {{mail_addr}} {{client_addr}} {{client_name}} {{auth_authen}}
"""


@dataclasses.dataclass(frozen=True)
class ChainCase:
    size: int
    sessions: int
    keepalive: bool
    messages: int

    @property
    def label(self) -> str:
        conn = "many/conn" if self.keepalive else "1/conn"
        return f"chain {self.size // 1024} KB c={self.sessions} r=1 {conn}"


def chain_cases(full: bool, scale: float) -> list[ChainCase]:
    if full:
        return [ChainCase(1024, 20, True, _count(2000, scale)),
                ChainCase(51200, 20, True, _count(1500, scale)),
                ChainCase(1024, 100, False, _count(2000, scale)),
                ChainCase(51200, 100, False, _count(1500, scale))]
    return [ChainCase(1024, 20, True, _count(400, scale)),
            ChainCase(51200, 20, True, _count(300, scale))]


@dataclasses.dataclass
class ChainResult:
    system: str
    case: str
    round: int
    messages: int
    seconds: float
    cpu_ms_per_msg: float  # the system's own processes
    peer_cpu_ms_per_msg: dict[str, float]  # rspamd, clamd, nsd during this run
    peak_pss_mb: float
    loadavg: str
    ok: bool
    note: str = ""
    evidence: str = ""  # the last message's results

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def loadgen_send_argv(port: int, message: Path, sessions: int, messages: int,
                      keepalive: bool, pin: bool, timeout: float) -> list[str]:
    # --unique: as with real mail, no message is byte-identical to another, so clamd
    # cannot answer from its cache of clean hashes (it would for Postfix's rspamd, which
    # sends the message without a per-message Received field, but not for mailedge).
    argv = [PYTHON, LOADGEN, "send", "--port", str(port), "--file", str(message),
            "--sessions", str(sessions), "--messages", str(messages), "--unique",
            "--rcpt-suffix", RCPT_SUFFIX, "--timeout", str(timeout)]
    if keepalive:
        argv.append("--keepalive")
    return pinned(TOOL_CPU, argv, pin)


def chain_run(server: Server, sink: LmtpSink, peers: ChainPeers, case: ChainCase,
              message: Path, round_no: int, pin: bool, timeout: float) -> ChainResult:
    """One run of the chain case; checks sink, rspamd's and clamd's counts."""
    note = ""
    sink_before, rcpts_before = sink.count(), sink.recipients()
    accepted_before = server.accepted() if isinstance(server, MailedgeNode) else 0
    scanned_before, clamd_before = peers.rspamd_scanned(), peers.clamd_scans()
    rspamd_log = peers.rspamd_log_size()
    mailedge_log = server.log.stat().st_size if isinstance(server, MailedgeNode) else 0
    roots = peers.cpu_roots()
    peer_before = {name: tree_cpu_seconds(pid) for name, pid in roots.items()}
    cpu_before = server.cpu_seconds()
    load = loadavg()
    expected = case.messages
    with RssSampler(server.root_pid) as rss:
        start = time.monotonic()
        done = subprocess.run(
            loadgen_send_argv(server.port, message, case.sessions, expected, case.keepalive,
                              pin, timeout),
            capture_output=True, timeout=timeout + 30)
        try:
            sent = json.loads(done.stdout)
        except ValueError:
            sent = {"sent": 0, "errors": 1, "first_errors": [done.stderr.decode()[-300:]]}
        if sent["errors"] or sent["sent"] != expected:
            note += f" loadgen sent {sent['sent']}, {sent['errors']} errors: " \
                    f"{sent['first_errors'][:2]};"
        wait_sink(sink, sink_before, rcpts_before, expected, expected, timeout)
        seconds = time.monotonic() - start
        cpu = server.cpu_seconds() - cpu_before
        peer_cpu = {name: tree_cpu_seconds(pid) - peer_before[name]
                    for name, pid in roots.items()}
    time.sleep(0.3)
    received, _, sink_problem = sink_note(sink, sink_before, rcpts_before, expected, expected)
    note += sink_problem
    scanned = peers.rspamd_scanned() - scanned_before
    if scanned != expected:
        note += f" rspamd scanned {scanned};"
    clamd_scans = peers.clamd_scans() - clamd_before
    if clamd_scans != expected:
        note += f" clamd scanned {clamd_scans};"
    # Every message must have passed SPF, DKIM and DMARC where the system checks them.
    tasks = peers.rspamd_tasks_since(rspamd_log)
    evidence = rspamd_symbols(tasks[-1]) if tasks else "?"
    if isinstance(server, MailedgeNode):
        acked = server.accepted() - accepted_before
        if acked != expected:
            note += f" mailedge counted {acked} accepted;"
        decisions = log_lines_since(server.log, mailedge_log, " results=")
        passed = sum(all(p in line for p in MAILEDGE_PASSES) for line in decisions)
        if decisions:
            evidence = (f"mailedge: {decisions[-1].split(' results=', 1)[1]}; "
                        f"rspamd: {evidence}")
    else:
        passed = sum(all(p in line for p in RSPAMD_PASSES) for line in tasks)
        evidence = f"rspamd: {evidence}"
    if passed != expected:
        note += f" SPF+DKIM+DMARC passed for {passed};"
    per = max(received, 1)
    return ChainResult(server.name, case.label, round_no, received, seconds,
                       cpu * 1000 / per,
                       {name: value * 1000 / per for name, value in peer_cpu.items()},
                       rss.peak / 2**20, load, not note, note.strip(), evidence)


#: What the chain case's checks write when SPF, DKIM and DMARC all passed.
RSPAMD_PASSES = ("R_SPF_ALLOW(", "R_DKIM_ALLOW(", "DMARC_POLICY_ALLOW(")
MAILEDGE_PASSES = ("spf:pass", "dkim@bench:pass", "dmarc@bench:pass")


def log_lines_since(path: Path, offset: int, needle: str) -> list[str]:
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines() if needle in line]


def rspamd_symbols(line: str) -> str:
    """The symbol list of one rspamd_task_write_log line (and its settings id)."""
    match = re.search(r"\(default: [^\[]*\[[^\]]*\] \[(.*?)\]\)", line)
    settings = re.search(r"settings_id: (\S+)", line)
    symbols = re.sub(r"\{[^}]*\}", "", match.group(1)) if match else "?"
    return symbols + (f" (settings {settings.group(1)})" if settings else "")


@dataclasses.dataclass
class ChainOutcome:
    cases: list[ChainCase]
    results: list[ChainResult]
    evidence: dict[str, str]  # system -> rspamd's symbols for its last warm-up message


def chain_part(workdir: Path, sink: LmtpSink, opts: Options, recipients: Path,
               tenants: Path) -> ChainOutcome:
    from chain import ChainPeers

    cases = chain_cases(opts.full, opts.scale)
    outcome = ChainOutcome(cases, [], {})
    base = workdir / "chain"
    base.mkdir()
    peers = ChainPeers(base, rspamd_workers=1 if opts.pin else opts.cores)
    started: list[Server] = []
    profiler: subprocess.Popen[bytes] | None = None
    try:
        peers.start()
        assert peers.clamd is not None and peers.rspamd is not None
        print(f"bench: chain peers up: NSD :{peers.dns.port}, clamd :{peers.clamd.port}, "
              f"rspamd :{peers.rspamd.port} (milter :{peers.milter_port}, "
              f"{peers.rspamd.startup_seconds or 0:.1f} s to start)", flush=True)
        messages = {}
        for size in sorted({c.size for c in cases}):
            path = base / f"signed-{size}.eml"
            path.write_bytes(peers.signed_message(size, f"1{RCPT_SUFFIX}"))
            messages[size] = path
        postfix = PostfixInstance(workdir, "postfix-chain", sink.port, opts.pin, recipients,
                                  extra=MILTER_CF.format(port=peers.milter_port))
        started.append(postfix)
        mailedge = MailedgeNode(
            workdir, "mailedge-chain", sink.port, opts.pin, opts.log_level, opts.workers,
            tenants, template="config/bench/mailedge-chain.toml",
            values={("dns", "nameservers"): json.dumps([f"127.0.0.1:{peers.dns.port}"]),
                    ("antivirus", "clamd"): json.dumps(f"unix:{peers.clamd.socket_path}"),
                    # On one host a mail engineer would use the UNIX socket (as for
                    # clamd); Postfix's milter connection is TCP (rspamd's proxy).
                    ("antispam", "rspamd_url"): json.dumps(peers.rspamd.unix_url)})
        started.append(mailedge)
        servers: list[Server] = [postfix, mailedge]
        if opts.py_spy is not None:
            profiler = start_py_spy(mailedge.root_pid, opts.py_spy, opts.pin)
        warmup = ChainCase(1024, 10, True, 100)
        for server in servers:
            r = chain_run(server, sink, peers, warmup, messages[1024], 0, opts.pin,
                          opts.timeout)
            outcome.evidence[server.name] = r.evidence
            print(f"bench: chain warm-up {server.name}: {r.rate:.0f} msg/s ok={r.ok} "
                  f"{r.note}", flush=True)
            print(f"bench:   results of {server.name}'s last message: {r.evidence}",
                  flush=True)
        for round_no in range(1, opts.rounds + 1):
            for case in cases:
                order = servers if round_no % 2 else servers[::-1]
                for server in order:
                    r = chain_run(server, sink, peers, case, messages[case.size], round_no,
                                  opts.pin, opts.timeout)
                    outcome.results.append(r)
                    peer = " ".join(f"{k} {v:.2f}" for k, v in r.peer_cpu_ms_per_msg.items())
                    print(f"round {round_no} {case.label:28} {server.name:8} "
                          f"{r.messages:6d} msgs {r.seconds:6.2f} s {r.rate:7.0f} msg/s "
                          f"own {r.cpu_ms_per_msg:5.2f} ms CPU/msg (peers: {peer}) "
                          f"{r.peak_pss_mb:5.0f} MB load {r.loadavg} "
                          f"{'ok' if r.ok else 'FAILED ' + r.note}", flush=True)
    finally:
        if profiler is not None:
            stop_py_spy(profiler)
        for server in reversed(started):
            server.stop()
        peers.stop()
    return outcome


# ---------------------------------------------------------------------------- idle


def greeting_seconds(port: int, timeout: float) -> float | None:
    """Seconds from connect() to a complete 220 greeting; None if none in `timeout`."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while True:
                s.settimeout(max(0.01, timeout - (time.monotonic() - start)))
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
                lines = data.split(b"\r\n")
                if any(line[:3] == b"220" and line[3:4] == b" " for line in lines):
                    elapsed = time.monotonic() - start
                    s.sendall(b"QUIT\r\n")
                    return elapsed
    except OSError:
        return None


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of `proc`'s stdout, or b"" after `timeout` seconds or at its end."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return buf
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0]
        elif proc.poll() is not None:
            return buf
    return b""


def idle_run(server: Server, workdir: Path, sessions: int, greet_timeout: float,
             sources: int, pin: bool, timeout: float, probes: int = 5,
             keep_waiting: bool = False) -> dict[str, object]:
    """Hold `sessions` idle sessions on `server`; memory per session, new greetings."""
    time.sleep(1.0)
    pss_before = tree_pss_bytes(server.root_pid)
    before = greeting_seconds(server.port, 5.0)
    argv = pinned(TOOL_CPU, [PYTHON, LOADGEN, "idle", "--port", str(server.port),
                             "--sessions", str(sessions), "--sources", str(sources),
                             "--greet-timeout", str(greet_timeout),
                             "--timeout", str(timeout), "--hold", str(timeout + 120)]
                  + (["--keep-waiting"] if keep_waiting else []), pin)
    err = (workdir / f"idle-{server.name}.err").open("wb")
    cpu_before = server.cpu_seconds()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    result: dict[str, object] = {"system": server.name, "sessions": sessions,
                                 "greet_timeout_s": greet_timeout, "sources": sources,
                                 "new_greeting_before_s": before}
    try:
        line = read_line(proc, timeout + 30)
        summary = json.loads(line) if line else {"error": "no summary from the client"}
        result.update(summary)
        result["server_cpu_s"] = server.cpu_seconds() - cpu_before
        time.sleep(1.0)
        pss_with = tree_pss_bytes(server.root_pid)
        opened = int(summary.get("opened", 0)) + int(summary.get("waiting", 0))
        result["pss_before_mb"] = pss_before / 2**20
        result["pss_with_mb"] = pss_with / 2**20
        result["kb_per_session"] = (pss_with - pss_before) / 1024 / opened if opened else None
        if isinstance(server, MailedgeNode):
            result["active_sessions_metric"] = server.metric("mailedge_active_sessions")
        result["new_greeting_s"] = [greeting_seconds(server.port, 3.0) for _ in range(probes)]
    finally:
        if proc.stdin is not None:
            try:
                proc.stdin.write(b"close\n")
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
    return result


def idle_part(workdir: Path, sink: LmtpSink, opts: Options, recipients: Path,
              tenants: Path) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    sources = opts.idle_sources or max(1, -(-opts.idle_sessions // 20000))
    mailedge = MailedgeNode(workdir, "mailedge-idle", sink.port, opts.pin, opts.log_level,
                            opts.workers, tenants)
    try:
        r = idle_run(mailedge, workdir, opts.idle_sessions, 10.0, sources, opts.pin,
                     opts.timeout)
    finally:
        mailedge.stop()
    results.append(r)
    print(f"bench: idle mailedge: {idle_line(r)}", flush=True)
    postfix = PostfixInstance(workdir, "postfix-idle", sink.port, opts.pin, recipients,
                              process_limit=100)
    try:
        r = idle_run(postfix, workdir, opts.postfix_idle_sessions, 1.0, 1, opts.pin,
                     min(opts.timeout, 60.0), probes=2, keep_waiting=True)
    finally:
        postfix.stop()
    results.append(r)
    print(f"bench: idle postfix: {idle_line(r)}", flush=True)
    return results


def _seconds_list(values: object) -> str:
    if not isinstance(values, list):
        return "-"
    return ", ".join("none" if v is None else f"{v * 1000:.0f} ms" for v in values)


def idle_line(r: dict[str, object]) -> str:
    kb = r.get("kb_per_session")
    return (f"{r.get('opened', 0)}/{r['sessions']} sessions held after EHLO, "
            f"{r.get('waiting', 0)} connected without greeting "
            f"({r.get('greeted_within_1s', 0)} greeted within 1 s, {r.get('failed', 0)} "
            f"failed, opened in {float(str(r.get('open_seconds', 0))):.1f} s, server CPU "
            f"{float(str(r.get('server_cpu_s', 0))):.1f} s); PSS "
            f"{float(str(r.get('pss_before_mb', 0))):.0f} -> "
            f"{float(str(r.get('pss_with_mb', 0))):.0f} MB = "
            f"{'-' if kb is None else f'{float(str(kb)):.1f}'} KB/session; new client's "
            f"greeting: {_seconds_list(r.get('new_greeting_s'))}")


# ---------------------------------------------------------------------------- dkim


def dkim_part(iterations: int) -> list[dict[str, object]]:
    """gateway/dkim_signer.py: ms per signature, RSA-2048 and Ed25519, 2 KB and 50 KB."""
    from chain import plain_message, rsa_key_pem
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.dkim_signer import DkimSigner

    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    out: list[dict[str, object]] = []
    for name, pem, target in (("RSA-2048", rsa_key_pem(2048), 1.0), ("Ed25519", ed_pem, 0.3)):
        signer = DkimSigner(pem, "bench", "client.example")
        for size in (2048, 51200):
            head = len(plain_message(0, f"1{RCPT_SUFFIX}"))
            message = plain_message(max(0, size - head), f"1{RCPT_SUFFIX}")
            for _ in range(20):
                signer.sign(message)
            walls = []
            cpu_start = time.process_time()
            for _ in range(iterations):
                t0 = time.perf_counter()
                signer.sign(message)
                walls.append(time.perf_counter() - t0)
            cpu = (time.process_time() - cpu_start) / iterations
            walls.sort()
            row: dict[str, object] = {
                "algorithm": name, "message_bytes": len(message), "signatures": iterations,
                "median_ms": statistics.median(walls) * 1000,
                "p99_ms": walls[min(len(walls) - 1, int(0.99 * len(walls)))] * 1000,
                "cpu_ms": cpu * 1000, "target_ms": target}
            row["met"] = float(str(row["median_ms"])) < target and cpu * 1000 < target
            out.append(row)
            print(f"bench: dkim {name} {len(message)} bytes: median "
                  f"{row['median_ms']:.3f} ms p99 {row['p99_ms']:.3f} ms CPU "
                  f"{row['cpu_ms']:.3f} ms/signature (target < {target} ms)", flush=True)
    return out


# ---------------------------------------------------------------------------- profile


def start_py_spy(pid: int, out: Path, pin: bool) -> subprocess.Popen[bytes]:
    argv = [str(REPO / ".venv/bin/py-spy"), "record", "--pid", str(pid), "--rate", "200",
            "--format", "raw", "--output", str(out), "--nonblocking", "--gil",
            "--subprocesses"]  # the workers of `mailedge run --workers N`
    return subprocess.Popen(pinned(TOOL_CPU, argv, pin), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_py_spy(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        stop_pid(profiler)


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
    yield ("| case | system | runs | messages | recipients at the sink | seconds (median) "
           "| msg/s (median) | CPU ms/msg (median) | peak PSS MB | checks |")
    yield "|---|---|---|---|---|---|---|---|---|---|"
    ratios: dict[str, list[float]] = {}
    for case in cases:
        for system in ("postfix", "mailedge"):
            runs = [r for r in results if r.case == case.label and r.system == system]
            if not runs:
                continue
            ok = sum(r.ok for r in runs)
            yield (f"| {case.label} | {system} | {len(runs)} | {runs[0].messages} "
                   f"| {runs[0].recipients} "
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
    for r in results:
        if not r.ok:
            yield f"- FAILED: {r.case} {r.system} round {r.round}: {r.note}"
    yield ""
    yield "| case | mailedge/Postfix msg/s (median) | spread over rounds |"
    yield "|---|---|---|"
    for label, values in ratios.items():
        median = f"{statistics.median(values):.2f}" if values else "-"
        yield f"| {label} | {median} | {spread(values)} |"


def chain_report(outcome: ChainOutcome) -> Iterator[str]:
    results = outcome.results
    peers = sorted({k for r in results for k in r.peer_cpu_ms_per_msg})
    yield ("| case | system | runs | messages | msg/s (median) | own CPU ms/msg (median) | "
           + " | ".join(f"{p} CPU ms/msg" for p in peers) + " | peak PSS MB | checks |")
    yield "|---|---|---|---|---|---|" + "---|" * len(peers) + "---|---|"
    for case in outcome.cases:
        for system in ("postfix", "mailedge"):
            runs = [r for r in results if r.case == case.label and r.system == system]
            if not runs:
                continue
            peer_cols = " | ".join(
                f"{statistics.median(r.peer_cpu_ms_per_msg.get(p, 0.0) for r in runs):.2f}"
                for p in peers)
            yield (f"| {case.label} | {system} | {len(runs)} | {runs[0].messages} "
                   f"| {statistics.median(r.rate for r in runs):.0f} "
                   f"| {statistics.median(r.cpu_ms_per_msg for r in runs):.2f} | {peer_cols} "
                   f"| {max(r.peak_pss_mb for r in runs):.0f} "
                   f"| {sum(r.ok for r in runs)}/{len(runs)} ok |")
    for r in results:
        if not r.ok:
            yield f"- FAILED: {r.case} {r.system} round {r.round}: {r.note}"
    yield ""
    yield ("Target: mailedge own CPU/msg <= half of Postfix own CPU/msg, and mailedge "
           "msg/s ahead (medians):")
    for case in outcome.cases:
        by_system = {system: [r for r in results
                              if r.case == case.label and r.system == system]
                     for system in ("postfix", "mailedge")}
        if not by_system["postfix"] or not by_system["mailedge"]:
            continue
        cpu = {k: statistics.median(r.cpu_ms_per_msg for r in v) for k, v in by_system.items()}
        rate = {k: statistics.median(r.rate for r in v) for k, v in by_system.items()}
        half = cpu["mailedge"] <= cpu["postfix"] / 2
        ahead = rate["mailedge"] > rate["postfix"]
        yield (f"- {case.label}: own CPU mailedge {cpu['mailedge']:.2f} vs Postfix "
               f"{cpu['postfix']:.2f} ms/msg (ratio {cpu['mailedge'] / cpu['postfix']:.2f}, "
               f"{'met' if half else 'NOT met'}); msg/s mailedge {rate['mailedge']:.0f} vs "
               f"Postfix {rate['postfix']:.0f} ({'met' if ahead else 'NOT met'})")
    yield ""
    yield "What each system checks in this case:"
    yield ("- mailedge: recipient lookup; SPF (MAIL, decided at end of DATA), DKIM "
           "verification, ARC, DMARC in its own code with DNS from NSD; clamd INSTREAM "
           "(its antivirus filter); rspamd /checkv2 for the spam rules, where a settings "
           "rule (MTA-Name) switches off rspamd's SPF_CHECK, DKIM_CHECK, DMARC_CALLBACK "
           "and CLAM_VIRUS, which mailedge did already; spool fsync; LMTP.")
    yield ("- Postfix: recipient lookup (hash: relay_recipient_maps); queue fsync; LMTP. "
           "Through its milter, rspamd does SPF, DKIM, DMARC, ARC, the spam rules and "
           "clamd (antivirus module), treating 127.0.0.1 as a remote client "
           "(check_local). Postfix itself checks none of these.")
    yield ("- Checked per run: every message passed SPF, DKIM and DMARC (mailedge's log; "
           "rspamd's R_SPF_ALLOW, R_DKIM_ALLOW, DMARC_POLICY_ALLOW for Postfix), rspamd "
           "scanned each message once and clamd each message once.")
    for system, evidence in outcome.evidence.items():
        yield f"- {system}, last warm-up message: {evidence}"


def latency_report(latencies: list[dict[str, object]]) -> Iterator[str]:
    yield "| system | rate msg/s | basis | messages | p50 ms | p99 ms | max ms | ok |"
    yield "|---|---|---|---|---|---|---|---|"
    for lat in latencies:
        yield (f"| {lat['system']} | {float(str(lat['rate'])):.0f} | {lat['basis']} "
               f"| {lat['messages']} | {float(str(lat['p50_ms'])):.1f} "
               f"| {float(str(lat['p99_ms'])):.1f} | {float(str(lat['max_ms'])):.1f} "
               f"| {lat['ok']} |")
    for lat in latencies:
        p99 = float(str(lat["p99_ms"]))
        yield (f"Target p99 < 50 ms: {lat['system']} {p99:.1f} ms "
               f"({'met' if p99 < 50 else 'NOT met'})")


def idle_report(rows: list[dict[str, object]]) -> Iterator[str]:
    yield ("| system | sessions tried | held after EHLO | connected, no greeting "
           "| greeted within 1 s | failed | open s "
           "| PSS before MB | PSS with MB | KB/session | new client's greeting |")
    yield "|---|---|---|---|---|---|---|---|---|---|---|"
    for r in rows:
        kb = r.get("kb_per_session")
        yield (f"| {r['system']} | {r['sessions']} | {r.get('opened', 0)} "
               f"| {r.get('waiting', 0)} "
               f"| {r.get('greeted_within_1s', 0)} | {r.get('failed', 0)} "
               f"| {float(str(r.get('open_seconds', 0))):.1f} "
               f"| {float(str(r.get('pss_before_mb', 0))):.0f} "
               f"| {float(str(r.get('pss_with_mb', 0))):.0f} "
               f"| {'-' if kb is None else f'{float(str(kb)):.1f}'} "
               f"| {_seconds_list(r.get('new_greeting_s'))} |")
    for r in rows:
        if r["system"] != "mailedge":
            continue
        greet = r.get("new_greeting_s")
        worst = (max((v if v is not None else float("inf")) for v in greet)
                 if isinstance(greet, list) and greet else float("inf"))
        kb = r.get("kb_per_session")
        kbf = float(str(kb)) if kb is not None else float("inf")
        yield (f"Target (mailedge, {r.get('opened', 0)} idle sessions): new greeting < 1 s: "
               f"worst {worst * 1000:.0f} ms ({'met' if worst < 1 else 'NOT met'}); "
               f"< 30 KB/session: {kbf:.1f} KB ({'met' if kbf < 30 else 'NOT met'})")


def dkim_report(rows: list[dict[str, object]]) -> Iterator[str]:
    yield ("| algorithm | message bytes | signatures | median ms | p99 ms | CPU ms/signature "
           "| target | met |")
    yield "|---|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['algorithm']} | {r['message_bytes']} | {r['signatures']} "
               f"| {float(str(r['median_ms'])):.3f} | {float(str(r['p99_ms'])):.3f} "
               f"| {float(str(r['cpu_ms'])):.3f} | < {r['target_ms']} ms | {r['met']} |")


# ---------------------------------------------------------------------------- main

PARTS = ("dkim", "relay", "chain", "idle")


@dataclasses.dataclass
class Options:
    full: bool
    scale: float
    rounds: int
    timeout: float
    pin: bool  # --pin one-core
    cores: int
    workers: int
    log_level: str
    idle_sessions: int
    idle_sources: int
    postfix_idle_sessions: int
    py_spy: Path | None = None  # where the chain part records mailedge, if asked


def chain_profile(path: Path) -> Path:
    """Where --py-spy FILE records the chain part: FILE with ".chain" before its suffix."""
    return path.with_name(f"{path.stem}.chain{path.suffix}")


def raise_nofile(needed: int) -> None:
    """RLIMIT_NOFILE for this process and what it starts (the servers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        except (ValueError, OSError) as exc:
            # Without CAP_SYS_RESOURCE (containers) the hard limit is as far as it goes.
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            print(f"bench: cannot raise RLIMIT_NOFILE to {needed} ({exc}); "
                  f"using the hard limit {hard}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole case matrix")
    parser.add_argument("--case", action="append", default=None,
                        help="run only this relay case of the whole matrix (repeatable), "
                             "by its label, e.g. '1 KB c=20 r=1 1/conn'")
    parser.add_argument("--only", action="append", choices=PARTS, default=None,
                        help="run only this part (repeatable): dkim, relay (with the "
                             "latency run), chain, idle; default: all")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per case (default 3)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the messages per run (default 1.0)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one run may take before it fails")
    parser.add_argument("--pin", choices=("none", "one-core"), default="none",
                        help="none (default): everything on all cores; one-core: servers "
                             "on CPU 0, tools and peers on CPU 1, one mailedge worker")
    parser.add_argument("--no-pin", action="store_true", help="same as --pin none")
    parser.add_argument("--workers", type=int, default=None,
                        help="mailedge run --workers N (default: cores; 1 with --pin "
                             "one-core)")
    parser.add_argument("--latency-rate", type=float, default=None,
                        help="msg/s of the latency run (default: 50 %% of each system's "
                             "peak from the 1 KB c=20 case; 0: skip it)")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--idle-sessions", type=int, default=10000,
                        help="idle sessions held on mailedge (default 10000)")
    parser.add_argument("--idle-sources", type=int, default=0,
                        help="source addresses 127.0.0.1..N for them (default: one per "
                             "20,000 sessions)")
    parser.add_argument("--postfix-idle-sessions", type=int, default=None,
                        help="sessions tried on Postfix with its default process limit "
                             "(default 300; 1000 with --full)")
    parser.add_argument("--dkim-signatures", type=int, default=None,
                        help="signatures per DKIM measurement (default 500; 5000 --full)")
    parser.add_argument("--log-level", default="info", help="mailedge's [node] log_level")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--py-spy", type=Path, dest="py_spy",
                        help="record mailedge with py-spy (collapsed stacks, workers "
                             "included) into this file during the relay part, and into "
                             "the same name with .chain before its suffix during the chain "
                             "part, and print where its CPU goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    pin = args.pin == "one-core" and not args.no_pin and cores >= 2
    if args.pin == "one-core" and cores < 2:
        print("bench: --pin one-core needs 2 CPUs; running unpinned", file=sys.stderr)
    workers = args.workers or (1 if pin else cores)
    if workers != 1 and not mailedge_has_workers_option():
        print(f"bench: `mailedge run` has no --workers option yet; running 1 worker "
              f"instead of {workers}", file=sys.stderr)
        workers = 1
    parts = args.only or list(PARTS)
    opts = Options(full=args.full, scale=args.scale, rounds=args.rounds or 3,
                   timeout=args.timeout, pin=pin, cores=cores, workers=workers,
                   log_level=args.log_level, idle_sessions=args.idle_sessions,
                   idle_sources=args.idle_sources,
                   postfix_idle_sessions=args.postfix_idle_sessions
                   or (1000 if args.full else 300),
                   py_spy=chain_profile(args.py_spy) if args.py_spy else None)
    cases = full_cases(args.scale) if args.full else short_cases(args.scale)
    if args.case:
        cases = [c for c in full_cases(args.scale) if c.label in args.case]
        unknown = set(args.case) - {c.label for c in cases}
        if unknown:
            print(f"bench: unknown --case {', '.join(sorted(unknown))}; cases are "
                  f"labelled like {PEAK_CASE!r}", file=sys.stderr)
            return 2
    if "relay" not in parts:
        cases = []
    tools = ["postfix", "postmap", "smtp-source", "smtp-sink"] + (["taskset"] if pin else [])
    if "chain" in parts:
        tools += ["rspamd", "clamd", "nsd"]
    for tool in tools:
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            print(f"bench: {tool} not found (bench/run.sh installs it)", file=sys.stderr)
            return 2

    # `timeout` or a kill sends SIGTERM: unwind so `finally` stops what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile(max(65536, opts.idle_sessions + opts.postfix_idle_sessions + 10000))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if "idle" in parts and nofile < opts.idle_sessions + 1000:
        # The client holds one descriptor per session, and so does one mailedge worker
        # at worst (SO_REUSEPORT spreads them, but not evenly).
        print(f"bench: RLIMIT_NOFILE is {nofile}: idle sessions limited to "
              f"{nofile - 1000} instead of {opts.idle_sessions}", file=sys.stderr)
        opts.idle_sessions = max(100, nofile - 1000)
    if pin:
        os.sched_setaffinity(0, {int(TOOL_CPU)})  # inherited by the peers we start
    workdir = Path(tempfile.mkdtemp(prefix="mailedge-bench-"))
    os.chmod(workdir, 0o755)  # Postfix daemons run as the postfix user
    print(f"bench: workdir {workdir}; {cores} CPUs; loadavg {loadavg()}; parts "
          f"{', '.join(parts)}; pinning "
          f"{'one-core: servers on CPU 0, tools and peers on CPU 1' if pin else 'none'}; "
          f"mailedge workers {workers}", flush=True)
    mailboxes = max([c.messages * c.recipients for c in cases]
                    + [c.messages for c in chain_cases(args.full, args.scale)]
                    + [WARMUP.messages, 1000])
    recipients, tenants = write_mailboxes(workdir, mailboxes)

    dkim_rows: list[dict[str, object]] = []
    results: list[RunResult] = []
    latencies: list[dict[str, object]] = []
    chain: ChainOutcome | None = None
    idle_rows: list[dict[str, object]] = []
    started: list[Server] = []
    profiler: subprocess.Popen[bytes] | None = None
    sink = LmtpSink(workdir, pin)
    try:
        if "dkim" in parts:
            dkim_rows = dkim_part(args.dkim_signatures or (5000 if args.full else 500))
        if "relay" in parts:
            postfix = PostfixInstance(workdir, "postfix", sink.port, pin, recipients)
            started.append(postfix)
            mailedge = MailedgeNode(workdir, "mailedge", sink.port, pin, args.log_level,
                                    workers, tenants)
            started.append(mailedge)
            servers: list[Server] = [postfix, mailedge]
            if args.py_spy:
                profiler = start_py_spy(mailedge.root_pid, args.py_spy, pin)
            for server in servers:
                r = run_once(server, sink, WARMUP, 0, pin, args.timeout)
                print(f"bench: warm-up {server.name}: {r.rate:.0f} msg/s ok={r.ok} {r.note}",
                      flush=True)
            for round_no in range(1, opts.rounds + 1):
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
            if args.latency_rate is None or args.latency_rate > 0:
                for server in servers:
                    peak = [r.rate for r in results
                            if r.case == PEAK_CASE and r.system == server.name and r.ok]
                    if args.latency_rate:
                        rate, basis = args.latency_rate, "fixed (--latency-rate)"
                    elif peak:
                        rate = statistics.median(peak) / 2
                        basis = f"50 % of {statistics.median(peak):.0f} msg/s peak"
                    else:
                        rate, basis = 100.0, "fixed 100 (no peak measured)"
                    lat = latency_run(server, sink, rate, args.latency_seconds, mailboxes,
                                      basis)
                    latencies.append(lat)
                    print(f"latency {server.name:8} at {lat['rate']:.0f} msg/s ({basis}): "
                          f"p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms "
                          f"max {lat['max_ms']:.1f} ms ({lat['messages']} msgs, "
                          f"ok={lat['ok']})", flush=True)
            if profiler is not None:
                stop_py_spy(profiler)
                profiler = None
            for server in reversed(started):
                server.stop()
            started.clear()
        if "chain" in parts:
            chain = chain_part(workdir, sink, opts, recipients, tenants)
        if "idle" in parts:
            idle_rows = idle_part(workdir, sink, opts, recipients, tenants)
    finally:
        if profiler is not None:
            stop_py_spy(profiler)
        for server in reversed(started):
            server.stop()
        sink.stop()
        if args.keep:
            print(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n## Results ({'full' if args.full else 'short'} mode, {opts.rounds} rounds, "
          f"scale {args.scale}, pinning {'one-core' if pin else 'none'}, "
          f"mailedge workers {workers}, {cores} CPUs)")
    if dkim_rows:
        print("\n### DKIM signing (gateway/dkim_signer.py, this process)\n")
        for line in dkim_report(dkim_rows):
            print(line)
    if results:
        print("\n### Plain relay\n")
        for line in report(cases, results):
            print(line)
    if latencies:
        print("\n### Latency, MAIL FROM -> 250 after the dot (1 KB, 10 sessions)\n")
        for line in latency_report(latencies):
            print(line)
    if chain is not None:
        print("\n### Full inbound chain (SPF, DKIM, DMARC, rspamd, clamd)\n")
        for line in chain_report(chain):
            print(line)
    if idle_rows:
        print("\n### Idle sessions\n")
        for line in idle_report(idle_rows):
            print(line)
    print(f"\nloadavg at end: {loadavg()}")
    for part, path in (("relay", args.py_spy), ("chain", opts.py_spy)):
        if path is not None and path.exists():
            print(f"\n### Where mailedge's CPU goes ({part} part, py-spy)\n")
            for line in profile_summary(path):
                print(line)
    if args.json:
        args.json.write_text(json.dumps({
            "options": dataclasses.asdict(opts),
            "dkim": dkim_rows,
            "runs": [dataclasses.asdict(r) | {"rate": r.rate} for r in results],
            "latency": latencies,
            "chain": [dataclasses.asdict(r) | {"rate": r.rate}
                      for r in (chain.results if chain else [])],
            "chain_rspamd_symbols": chain.evidence if chain else {},
            "idle": idle_rows}, indent=2, default=str))
    failed = ([r for r in results if not r.ok] + [x for x in latencies if not x["ok"]]
              + [r for r in (chain.results if chain else []) if not r.ok])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
