"""Start a mailedge node inside the test's event loop, on free loopback ports.

`NodeHarness` writes a throwaway config and tenants file into a temp dir, starts a
`gateway.app.Node` (the same composition root `mailedge run` uses), and stops it.
Tests talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.app import Node
from gateway.config import load_config
from gateway.spool import SpoolFS
from tenant_api_client import TenantDirectory
from tests.peers.ports import free_port

DEFAULT_TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test", "bob@example.test", "postmaster@example.test",
             "abuse@example.test", "dave@example.test"]
[tenant.acme.mailbox."disabled@example.test"]
disabled = true
[tenant.acme.mailbox."full@example.test"]
over_quota = true

[tenant.globex]
domains = ["example.org"]
mailboxes = ["carol@example.org", "postmaster@example.org"]
[tenant.globex.policy]
max_message_size = 2000
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(tables: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class NodeHarness:
    root: Path
    tenants: str = DEFAULT_TENANTS
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    spool_fs: SpoolFS | None = None
    directory: TenantDirectory | None = None
    node: Node | None = None
    port: int = 0
    admin_port: int = 0

    def config_tables(self) -> dict[str, dict[str, Any]]:
        self.port = self.port or free_port()
        self.admin_port = self.admin_port or free_port()
        tables: dict[str, dict[str, Any]] = {
            "node": {"name": "test1", "spool_dir": str(self.root / "spool"),
                     "log_level": "debug"},
            "inbound": {"listen": [f"127.0.0.1:{self.port}"], "hostname": "mx.test.example",
                        "max_message_size": 1_000_000},
            "tenants": {"file": str(self.root / "tenants.toml")},
            "storage": {"maildir": str(self.root / "mail"), "backend_pause": 0.5},
            "queue": {"retry_min": 0.3, "retry_max": 1.0},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "pipeline": {"message": ["size_limit"]},
        }
        for table, keys in self.overrides.items():
            tables.setdefault(table, {}).update(keys)
            for key, value in keys.items():
                if value is None:
                    tables[table].pop(key)
        return tables

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tenants.toml").write_text(self.tenants)
        path = self.root / "mailedge.toml"
        path.write_text(render_config(self.config_tables()))
        return path

    async def start(self) -> NodeHarness:
        settings = load_config(self.write())
        self.node = Node(settings, spool_fs=self.spool_fs, directory=self.directory)
        await self.node.start()
        return self

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.stop()
            self.node = None

    @property
    def maildir(self) -> Path:
        return self.root / "mail"

    def maildir_messages(self, address: str) -> list[bytes]:
        local, _, domain = address.partition("@")
        folder = self.maildir / domain / local
        files = sorted((folder / "new").glob("*")) + sorted((folder / "cur").glob("*")) \
            if folder.exists() else []
        # Maildir files use LF line ends (as Dovecot's do); the wire form has CRLF.
        return [f.read_bytes().replace(b"\n", b"\r\n") for f in files]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the queue has no delivery in progress and nothing due now."""
        assert self.node is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = self.node.queue
            if queue.idle.is_set() and all(e.next_at > time.time() or not e.pending()
                                           for e in queue.entries.values()):
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("queue did not become idle")

    async def wait_empty(self, timeout: float = 10.0) -> None:
        assert self.node is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.node.queue.entries and self.node.queue.idle.is_set():
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"queue not empty: {list(self.node.queue.entries)}")


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise TimeoutError("condition not met in time")


def addresses(*items: str) -> Iterable[str]:
    return items
