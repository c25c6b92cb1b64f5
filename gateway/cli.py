"""The `mailedge` command: run a node, check a configuration, inspect the pipeline and queue.

    mailedge run            --config PATH [--workers N]
    mailedge check-config   --config PATH
    mailedge print-pipeline --config PATH [--tenant T]
    mailedge queue list|show ID|retry ID|delete ID --config PATH
    mailedge quarantine list [TENANT] | show|release|delete TENANT ID --config PATH
    mailedge dev-cert       [--dir var/tls] [--hostname NAME]
    mailedge tenant-api     --data FILE --listen HOST:PORT --token TOKEN
    mailedge hash-password  [--password P]

`queue` talks to the running node's admin API (`[admin] listen`), so the node's
in-memory schedule and the spool stay in agreement; with the node stopped, `list`
and `show` read the spool directly and `delete` removes the files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import MAX_WORKERS, ConfigError, Settings, load_config
from gateway.pipeline import PipelineConfigError
from tenant_api_client import InvalidData
from tenant_api_client.filedir import FileDirectory

if TYPE_CHECKING:
    from gateway.app import WorkerRole

DEFAULT_CONFIG = "config/mailedge.toml"
log = logging.getLogger("mailedge")


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr through a 64 KiB buffer, written out at least every `interval` seconds.

    A node logs every message; a write (and flush) per record on the event loop cost
    CPU and, with the log on the spool's disk, stalled the loop behind fsyncs. Records
    at WARNING and above are written at once; a SIGKILL loses at most `interval` of
    info lines.
    """

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(open(sys.stderr.fileno(), "w", buffering=1 << 16,  # noqa: SIM115
                              encoding="utf-8", errors="backslashreplace", closefd=False))
        self.interval = interval
        self._closed = threading.Event()
        threading.Thread(target=self._flush_now_and_then, name="log-flush",
                         daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _flush_now_and_then(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()


class LineFormatter(logging.Formatter):
    """`<date time,ms> LEVEL [tag] logger: message`, the date formatted once a second.

    The same text as Formatter("%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"),
    without its per-record strftime; records with exception or stack information take
    the standard path.
    """

    def __init__(self, tag: str = "") -> None:
        super().__init__(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        self._tag = tag
        self._second = -1
        self._date = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        second = int(record.created)
        if second != self._second:
            self._date = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        record.message = record.getMessage()
        return (f"{self._date},{int(record.msecs):03d} {record.levelname} {self._tag}"
                f"{record.name}: {record.message}")


def _setup_logging(level: str, process: str = "") -> None:
    """Log to stderr; `process` ("w1", "main") tells a node's processes apart."""
    tag = f"[{process}] " if process else ""
    # Our format names no thread, process or source line: skip collecting them per record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BufferedStderrHandler()
    handler.setFormatter(LineFormatter(tag))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])
    # aiosmtpd logs every connection at INFO under "mail.log"; ours say the same with ids.
    if level != "debug":
        logging.getLogger("mail.log").setLevel(logging.WARNING)


def _load(path: str) -> Settings:
    try:
        return load_config(Path(path))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(2) from None


def check_config(path: str) -> int:
    """Validate the whole configuration and tenant directory; print every problem."""
    problems: list[str] = []
    try:
        settings = load_config(Path(path))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    if settings.tenants.api_url is None:
        try:
            FileDirectory(settings.tenants.file)
        except InvalidData as exc:
            problems.append(exc.render(str(settings.tenants.file)))
    elif settings.tenants.token_file is not None and not settings.tenants.token_file.exists():
        problems.append(f"{path}: tenants.token_file: {settings.tenants.token_file} "
                        "does not exist")
    try:
        from gateway.app import build_pipeline

        build_pipeline(settings)
    except PipelineConfigError as exc:
        problems.extend(f"{path}: {line}" for line in str(exc).splitlines())
    for cert in (settings.inbound.tls_cert, settings.inbound.tls_key):
        if cert is not None and not cert.exists():
            problems.append(f"{path}: inbound.tls_cert/tls_key: {cert} does not exist")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    source = settings.tenants.api_url or f"{settings.tenants.file}: ok"
    print(f"{path}: ok (tenants: {source})")
    return 0


def print_pipeline(path: str, tenant: str | None) -> int:
    settings = _load(path)
    from gateway.app import build_pipeline

    try:
        pipeline = build_pipeline(settings)
    except PipelineConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(pipeline.describe())
    if tenant is not None:
        from gateway.app import build_directory

        async def lookup() -> Any:
            directory = build_directory(settings)
            try:
                return await directory.tenant(tenant)
            finally:
                await directory.aclose()

        found = asyncio.run(lookup())
        if found is None:
            print(f"no tenant {tenant!r}", file=sys.stderr)
            return 1
        print(f"tenant {found.id}: domains {', '.join(found.domains)}; policy "
              + ", ".join(f"{k}={v}" for k, v in found.policy.as_mapping().items()))
    return 0


async def _run_node(settings: Settings, role: WorkerRole | None = None,
                    parent_fd: int | None = None) -> None:
    from gateway.app import Node

    node = Node(settings, role=role)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_fd is not None:
        # EOF on the supervisor's pipe: it is gone, so stop rather than linger unsupervised.
        def parent_gone() -> None:
            if not os.read(parent_fd, 1):
                log.error("supervisor gone; stopping")
                loop.remove_reader(parent_fd)
                stop.set()
        loop.add_reader(parent_fd, parent_gone)
    await node.start()
    await stop.wait()
    log.info("shutting down")
    await node.stop()


def _event_loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def run(path: str, workers: int | None = None) -> int:
    settings = _load(path)
    from gateway.workers import Supervisor, default_worker_count

    count = workers if workers is not None else default_worker_count(settings)
    if not 1 <= count <= MAX_WORKERS:
        print(f"mailedge: --workers must be 1 to {MAX_WORKERS}", file=sys.stderr)
        return 2
    if count > 1:
        _setup_logging(settings.node.log_level, "main")
        if not settings.state.redis_url:
            log.warning("%d workers without [state] redis_url: connection limits, "
                        "greylisting and reputation are counted per worker", count)
        try:
            return int(_event_loop_runner()(Supervisor(Path(path), settings, count).run()))
        except OSError as exc:
            print(f"mailedge: cannot start: {exc}", file=sys.stderr)
            return 1
    _setup_logging(settings.node.log_level)
    return _serve(settings)


def run_worker(path: str, index: int, count: int, fds: str, admin_socket: str,
               parent_fd: int) -> int:
    """One worker of `mailedge run --workers N` (started by gateway/workers.py)."""
    from gateway.app import WorkerRole

    settings = _load(path)
    _setup_logging(settings.node.log_level, f"w{index}")
    inbound = dataclasses.replace(settings.inbound,
                                  max_connections=-(-settings.inbound.max_connections // count))
    settings = dataclasses.replace(settings, inbound=inbound)
    listeners = tuple(socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd)
    role = WorkerRole(index=index, count=count, listeners=listeners,
                      admin_socket=Path(admin_socket))
    return _serve(settings, role, parent_fd)


def _serve(settings: Settings, role: WorkerRole | None = None,
           parent_fd: int | None = None) -> int:
    from gateway.ownership import SpoolBusy

    runner = _event_loop_runner()
    try:
        runner(_run_node(settings, role, parent_fd))
    except InvalidData as exc:
        print(exc.render(str(settings.tenants.file)), file=sys.stderr)
        return 2
    except PipelineConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (OSError, SpoolBusy) as exc:
        print(f"mailedge: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _admin(settings: Settings, method: str, path: str) -> Any:
    admin = settings.admin.listen
    if admin is None:
        raise ConnectionError("no [admin] listen configured")
    request = urllib.request.Request(f"http://{admin}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def queue_command(path: str, action: str, queue_id: str | None) -> int:
    settings = _load(path)
    if action in ("show", "retry", "delete") and not queue_id:
        print(f"mailedge queue {action} needs a queue id", file=sys.stderr)
        return 2
    routes = {"list": ("GET", "/queue"), "show": ("GET", f"/queue/{queue_id}"),
              "retry": ("POST", f"/queue/{queue_id}/retry" if queue_id else "/queue/retry"),
              "delete": ("DELETE", f"/queue/{queue_id}")}
    method, url = routes[action]
    try:
        result = _admin(settings, method, url)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            print(f"no message {queue_id} in the queue", file=sys.stderr)
            return 1
        raise
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return _queue_offline(settings, action, queue_id)
    _print_queue(action, result)
    return 0


def _print_queue(action: str, result: Any) -> None:
    if action == "list":
        if not result:
            print("queue is empty")
        for entry in result:
            pending = sum(1 for r in entry["recipients"] if r["state"] == "pending")
            received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["received"]))
            print(f"{entry['id']}  {received}"
                  f"  <{entry['sender']}>  {len(entry['recipients'])} rcpt, {pending} pending,"
                  f" {entry['attempts']} attempt(s)"
                  + (f"  last: {entry['last_error']}" if entry["last_error"] else ""))
    else:
        print(json.dumps(result, indent=2))


@contextlib.contextmanager
def _node_stopped(settings: Settings) -> Iterator[None]:
    """Hold every spool slot while changing the spool offline, so no node is running.

    Reaching here means the admin endpoint did not answer; a node that runs anyway
    (no [admin] listen, or a firewall) must not have its spool changed under it.
    """
    from gateway.ownership import SlotOwnership, SpoolBusy

    ownership = SlotOwnership(settings.node.spool_dir)
    try:
        ownership.acquire(0.0)
    except SpoolBusy:
        raise SystemExit("mailedge: a node is running on this spool, but its admin "
                         "endpoint ([admin] listen) does not answer; nothing changed") from None
    try:
        yield
    finally:
        ownership.release()


def _queue_offline(settings: Settings, action: str, queue_id: str | None) -> int:
    """The node is not running: work on the spool files directly."""
    from gateway.admin import entry_summary
    from gateway.queue import QueueEntry
    from gateway.spool import Spool

    spool = Spool(settings.node.spool_dir, threads=1)
    try:
        ids = [queue_id] if queue_id else list(spool.queued_ids(clean=False))
        if action == "retry":
            print("node not running: every queued message is retried when it starts")
            return 0
        summaries = []
        for qid in ids:
            assert qid is not None
            if not spool.msg_path(qid).exists():
                print(f"no message {qid} in the queue", file=sys.stderr)
                return 1
            if action == "delete":
                with _node_stopped(settings):
                    spool.remove_sync(qid)
                print(json.dumps({"id": qid, "deleted": True}))
                return 0
            envelope, _ = spool.load_sync(qid)
            entry = QueueEntry(envelope)
            for record in spool.load_state_sync(qid):
                entry.apply(record)
            summaries.append(entry_summary(entry))
        _print_queue(action, summaries if action == "list" else summaries[0])
        return 0
    finally:
        spool.close()


def quarantine_command(path: str, action: str, tenant: str | None,
                       entry_id: str | None) -> int:
    """Quarantine actions through the running node, or on the files when it is down."""
    settings = _load(path)
    if action != "list" and not (tenant and entry_id):
        print(f"mailedge quarantine {action} needs a tenant and an id", file=sys.stderr)
        return 2
    from urllib.parse import quote

    base = f"/quarantine/{quote(tenant or '', safe='')}/{quote(entry_id or '', safe='')}"
    method, url = {"list": ("GET", "/quarantine" + (f"?tenant={quote(tenant)}" if tenant
                                                     else "")),
                   "show": ("GET", base), "release": ("POST", f"{base}/release"),
                   "delete": ("DELETE", base)}[action]
    try:
        result = _admin(settings, method, url)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            print(f"no quarantined message {tenant}/{entry_id}", file=sys.stderr)
            return 1
        raise
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return _quarantine_offline(settings, action, tenant, entry_id)
    _print_quarantine(action, result)
    return 0


def _print_quarantine(action: str, result: Any) -> None:
    if action != "list":
        print(json.dumps(result, indent=2))
        return
    if not result:
        print("quarantine is empty")
    for entry in result:
        received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["received"]))
        print(f"{entry['tenant']}  {entry['id']}  {received}  <{entry['sender']}>  "
              f"{', '.join(entry['recipients'])}  {entry['reason']}")


def _quarantine_offline(settings: Settings, action: str, tenant: str | None,
                        entry_id: str | None) -> int:
    from gateway.quarantine import NotQuarantined, Quarantine
    from gateway.spool import QueueIdFactory, Spool, SpoolFS

    quarantine = Quarantine(settings.node.spool_dir / "quarantine", SpoolFS())
    try:
        if action == "list":
            _print_quarantine("list", [e.summary() for e in quarantine.entries(tenant)])
        elif action == "show":
            assert tenant and entry_id
            _print_quarantine("show", quarantine.entry(tenant, entry_id).summary())
        elif action == "delete":
            assert tenant and entry_id
            with _node_stopped(settings):
                quarantine.delete(tenant, entry_id)
            print(json.dumps({"deleted": True}))
        else:
            assert tenant and entry_id
            import msgspec

            with _node_stopped(settings):
                envelope, message = quarantine.take(tenant, entry_id)
                spool = Spool(settings.node.spool_dir, threads=1)
                released = msgspec.structs.replace(
                    envelope, id=QueueIdFactory(settings.node.name).new(),
                    received=time.time())
                try:
                    asyncio.run(spool.commit(released, message))
                finally:
                    spool.close()
                quarantine.delete(tenant, entry_id)
            print(json.dumps({"released": True, "queue_id": released.id,
                              "note": "node not running: delivered when it starts"}))
    except NotQuarantined:
        print(f"no quarantined message {tenant}/{entry_id}", file=sys.stderr)
        return 1
    return 0


def tenant_api(data: Path, listen: str, token: str | None) -> int:
    """Serve the tenant API contract from a tenants file (the reference server)."""
    import os

    from gateway.config import parse_host_port
    from tenant_api_client.server import serve

    _setup_logging("info")
    address = parse_host_port(listen)
    if address is None:
        print(f"mailedge tenant-api: --listen {listen!r} is not host:port", file=sys.stderr)
        return 2
    token = token or os.environ.get("MAILEDGE_API_TOKEN")
    if not token:
        print("mailedge tenant-api: give --token or set MAILEDGE_API_TOKEN", file=sys.stderr)
        return 2
    try:
        FileDirectory(data)
    except InvalidData as exc:
        print(exc.render(str(data)), file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(data, address.host, address.port, token))
    return 0


def dev_cert(directory: Path, hostname: str) -> int:
    if (directory / "cert.pem").exists() and (directory / "key.pem").exists():
        return 0
    from gateway.devcert import make_self_signed

    cert, key = make_self_signed(directory, hostname)
    print(f"wrote self-signed {cert} and {key} for {hostname}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailedge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG, help="path to mailedge.toml")
        return p

    rp = with_config(commands.add_parser("run", help="run a node"))
    rp.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: [node] workers; 0 there means one per "
                         "core with Redis state, else 1)")
    wp = with_config(commands.add_parser("worker", help=argparse.SUPPRESS))
    wp.add_argument("--index", type=int, required=True)
    wp.add_argument("--count", type=int, required=True)
    wp.add_argument("--fds", required=True)
    wp.add_argument("--admin-socket", required=True)
    wp.add_argument("--parent-fd", type=int, required=True)
    with_config(commands.add_parser("check-config", help="validate config and tenants"))
    pp = with_config(commands.add_parser("print-pipeline", help="show the filter order"))
    pp.add_argument("--tenant")
    qa = with_config(commands.add_parser("quarantine", help="list, show, release, delete "
                                         "quarantined copies"))
    qa.add_argument("action", choices=["list", "show", "release", "delete"])
    qa.add_argument("tenant", nargs="?")
    qa.add_argument("id", nargs="?")
    ta = commands.add_parser("tenant-api", help="run the reference tenant API server")
    ta.add_argument("--data", default="config/tenants.toml", help="tenants file to serve")
    ta.add_argument("--listen", default="127.0.0.1:8081")
    ta.add_argument("--token", default=None,
                    help="bearer token clients must send (default: $MAILEDGE_API_TOKEN)")
    hp = commands.add_parser("hash-password", help="hash a password for the tenants file")
    hp.add_argument("--password", help="default: read from standard input")
    dc = commands.add_parser("dev-cert", help="make a self-signed TLS pair if missing")
    dc.add_argument("--dir", default="var/tls")
    dc.add_argument("--hostname", default="localhost")
    qp = with_config(commands.add_parser("queue", help="inspect or act on the queue"))
    qp.add_argument("action", choices=["list", "show", "retry", "delete"])
    qp.add_argument("id", nargs="?")
    args = parser.parse_args(argv)

    if args.command == "run":
        return run(args.config, args.workers)
    if args.command == "worker":
        return run_worker(args.config, args.index, args.count, args.fds, args.admin_socket,
                          args.parent_fd)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "print-pipeline":
        return print_pipeline(args.config, args.tenant)
    if args.command == "quarantine":
        return quarantine_command(args.config, args.action, args.tenant, args.id)
    if args.command == "tenant-api":
        return tenant_api(Path(args.data), args.listen, args.token)
    if args.command == "hash-password":
        from tenant_api_client.passwords import hash_password

        password = args.password if args.password is not None else sys.stdin.readline()
        print(hash_password(password.rstrip("\n")))
        return 0
    if args.command == "dev-cert":
        return dev_cert(Path(args.dir), args.hostname)
    if args.command == "queue":
        with contextlib.suppress(BrokenPipeError):
            return queue_command(args.config, args.action, args.id)
        return 0
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
