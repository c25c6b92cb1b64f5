"""Client CPU per rspamd scan (filters/rspamd.py `RspamdClient`) against a real rspamd.

Run by hand from the repository root (not part of the test suite nor of bench/bench.py)::

    .venv/bin/python bench/rspamd_client.py                  # uvloop, N=500
    .venv/bin/python bench/rspamd_client.py --loop asyncio   # the stdlib loop
    .venv/bin/python bench/rspamd_client.py --compare OLD.py # A/B in the same run

It starts a private rspamd 3.4 with the test helper (tests/peers/rspamd.py: stock Debian
configuration, `http_headers` on, DNS answered NXDOMAIN at once by its own responder
process, one normal worker unless `--workers`), whose normal worker listens on a TCP port
and on a UNIX socket (`bind_socket` twice). Then, for each client and each message size
(`--sizes`, default 2 KB and 50 KB plain-text messages), for each transport (`tcp`,
`unix`) it warms up with 20 scans and runs `N` scans (`-n`, default 500) twice:
sequentially (`c=1`) and with 20 in flight (`c=20`: 20 tasks taking turns on a shared
counter). Each scan sends the headers mailedge sends (IP, Helo, Hostname, From, two Rcpt,
Queue-Id, MTA-Name, SPF, DKIM, DMARC).

Figures: `cpu ms/scan` is `time.process_time()` (user + system CPU of this whole process:
the event loop, the client, msgspec decoding and this harness's own few lines) over the
batch divided by N; nothing is subtracted. rspamd's and the responder's CPU are in other
processes and not counted. `wall ms/scan` and `scans/s` show the throughput of the pair
(on a shared 2-core machine mostly rspamd's). Each figure is the median of `--repeat`
runs (default 3) of the batch, to damp the noise of a shared machine.

`--compare PATH` loads another `RspamdClient` from a file (e.g. the previous version:
`git show HEAD~3:filters/rspamd.py > /tmp/old_rspamd.py`) and measures it in the same run,
interleaved with ours, so both see the same machine. A client that cannot take a `unix:`
URL is measured over TCP only.

The rspamd work directory is a temporary directory, removed at the end; the Hyperscan cache
in var/rspamd-hs-cache/ is shared with the tests (a cold start takes ~7 s).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filters.rspamd import RspamdClient
from tests.peers.ports import free_port
from tests.peers.rspamd import Rspamd

HEADERS: dict[str, Any] = {
    "ip": "192.0.2.10", "helo": "mail.client.example", "hostname": "mail.client.example",
    "sender": "alice@client.example", "recipients": ["bob@example.net", "carol@example.net"],
    "mta_name": "mx.mailedge.example", "spf": "pass", "dkim": [("pass", "client.example")],
    "dmarc": "pass",
}


def message(size: int) -> bytes:
    head = (b"From: Alice <alice@client.example>\r\nTo: bob@example.net\r\n"
            b"Subject: quarterly figures\r\nMessage-ID: <bench@client.example>\r\n"
            b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"Some ordinary text of a plain message, nothing to see here at all.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def load_client(path: str) -> type[Any]:
    spec = importlib.util.spec_from_file_location("compared_rspamd", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module.RspamdClient  # type: ignore[no-any-return]


async def batch(client: Any, data: bytes, count: int, concurrency: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `count` scans, `concurrency` in flight."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.check(data, queue_id="bench", **HEADERS)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def measure(clients: dict[str, type[Any]], urls: dict[str, str], sizes: list[int],
                  count: int, repeat: int) -> list[tuple[str, ...]]:
    rows = []
    for size in sizes:
        data = message(size)
        for transport, url in urls.items():
            for concurrency in (1, 20):
                samples: dict[str, list[tuple[float, float]]] = {n: [] for n in clients}
                instances = {}
                for name, cls in clients.items():
                    instances[name] = cls(url, timeout=30, max_size=1 << 24)
                    try:
                        for _ in range(20):
                            await instances[name].check(data, **HEADERS)
                    except Exception as exc:  # e.g. the old client and unix:
                        print(f"  {name} {transport}: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
                        await instances.pop(name).aclose()
                for _ in range(repeat):  # interleaved: both clients see the same machine
                    for name, instance in instances.items():
                        samples[name].append(await batch(instance, data, count, concurrency))
                for name, instance in instances.items():
                    await instance.aclose()
                    cpu = statistics.median(s[0] for s in samples[name])
                    wall = statistics.median(s[1] for s in samples[name])
                    rows.append((name, f"{len(data) / 1000:.0f} KB", transport,
                                 f"c={concurrency}", f"{cpu / count * 1000:.3f}",
                                 f"{wall / count * 1000:.3f}", f"{count / wall:.0f}"))
                    print("  ".join(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=500, help="scans per batch (500)")
    parser.add_argument("--repeat", type=int, default=3, help="batches per figure (3)")
    parser.add_argument("--sizes", default="2000,50000", help="message sizes in bytes")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--workers", type=int, default=1, help="rspamd normal workers")
    parser.add_argument("--compare", metavar="PATH",
                        help="another filters/rspamd.py to measure in the same run")
    parser.add_argument("--transports", default="tcp,unix")
    args = parser.parse_args()

    clients: dict[str, type[Any]] = {"ours": RspamdClient}
    if args.compare:
        clients["compared"] = load_client(args.compare)
    with tempfile.TemporaryDirectory(prefix="mailedge-bench-rspamd-") as tmp:
        workdir = Path(tmp) / "rspamd"
        socket_path = workdir / "run" / "normal.sock"
        port = free_port()
        normal = (f'bind_socket = "127.0.0.1:{port}";\n'
                  f'bind_socket = "{socket_path}";\ncount = {args.workers};\n')
        with Rspamd(workdir, port=port, workers=args.workers,
                    override={"worker-normal.inc": normal}) as rspamd:
            urls = {"tcp": rspamd.url, "unix": f"unix:{socket_path}"}
            urls = {t: u for t, u in urls.items() if t in args.transports.split(",")}
            print(f"rspamd {rspamd.url} + {socket_path}, loop {args.loop}, N={args.n}, "
                  f"median of {args.repeat}", file=sys.stderr)
            coroutine = measure(clients, urls, [int(s) for s in args.sizes.split(",")],
                                args.n, args.repeat)
            if args.loop == "uvloop":
                import uvloop
                rows = uvloop.run(coroutine)
            else:
                rows = asyncio.run(coroutine)
    header = ("client", "size", "via", "conc", "cpu ms/scan", "wall ms/scan", "scans/s")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
