"""A private Dovecot LMTP server for integration tests.

Theory of operation
-------------------
:class:`DovecotLmtp` runs its own Dovecot master (``dovecot -F -c CONF``), never the
system's. Everything that instance owns lives in one temporary directory::

    <workdir>/                 mode 0711, so Dovecot's unprivileged users reach what they need
        dovecot.conf           generated from the template below (Dovecot 2.3 syntax)
        users                  passwd-file used as passdb and userdb: one line per mailbox
        base/                  base_dir: sockets, master.pid
        state/                 state_dir (instance registry, kept out of /var/lib/dovecot)
        dovecot.log            log_path: every log line of every Dovecot process
        dovecot.out            the master's own stdout/stderr (errors before logging is up)
        lmtp.sock              the LMTP UNIX socket (beside the TCP listener on 127.0.0.1)
        mail/<domain>/<local>/ one Maildir per mailbox (``mail_location =
                               maildir:<workdir>/mail/%d/%n``), owned by the mail user;
                               INBOX is the Maildir itself (new/, cur/, tmp/), other
                               folders are Maildir++ subfolders (``.Name/``)

The master runs in the foreground (``-F``) as our child, so ``master.pid`` holds the PID of
the :class:`subprocess.Popen` we keep: :meth:`DovecotLmtp.stop` sends it SIGTERM, reaps it,
and then SIGKILLs any process of this instance that outlived it (its descendants noted
before the kill, and anything titled ``dovecot-<instance_name>/...``). Running in the
foreground matters on machines whose PID 1 reaps orphans lazily: a daemonized master that
was killed stays a zombie there for a while, and Dovecot refuses to start again while the
PID in ``master.pid`` still exists.

:meth:`DovecotLmtp.start` fails fast: it checks the Dovecot version (the template is 2.3
syntax; 2.4 changed it), runs ``doveconf -n`` on the generated file, and then waits until
the TCP port answers ``LHLO`` with 250; a master that exits, or an ``Error:``/``Fatal:`` in
the log, ends the wait at once with the log in the exception. When the port was picked by
:func:`~tests.peers.ports.free_port` and somebody else bound it first, start retries with a
new port.

What Dovecot 2.3.19 does, observed with this configuration
----------------------------------------------------------
* ``LHLO`` lists 8BITMIME, CHUNKING, ENHANCEDSTATUSCODES, PIPELINING.
* Unknown recipient: ``550 5.1.1 <x@y> User doesn't exist: x@y`` at RCPT.
* Over quota, with ``lmtp_rcpt_check_quota = yes``: a mailbox whose usage already exceeds its
  limit is refused at RCPT with ``552 5.2.2 <x@y> Quota exceeded (mailbox for user is
  full)`` (``452 4.2.2`` with ``quota_tempfail=True``, i.e. ``quota_full_tempfail = yes``).
  A mailbox still under its limit passes RCPT; if the message then does not fit, its
  per-recipient reply after DATA is the same 552 5.2.2 (or 452 4.2.2).
* Subaddresses: ``recipient_delimiter`` is ``+``, so ``alice+tag@...`` lands in alice's INBOX.
* Stored message = headers Dovecot prepends + the message exactly as sent (dot-unstuffed).
  It prepends ``Return-Path: <envelope sender>``, then ``Delivered-To: <rcpt>`` only when
  the transaction had a single recipient, then a ``Received: from <LHLO name>
  ([client ip]) by <hostname> with LMTP id <id> (envelope-from <sender>) [for <rcpt>];
  <date>`` header folded over several lines (``for`` only with a single recipient). With
  several recipients one file is written and hard-linked into each Maildir, which is why
  the per-recipient headers are left out.
* ``mail_save_crlf = yes`` (the default here, ``save_crlf=True``) stores CRLF line endings,
  so the stored bytes after the added headers equal the bytes on the wire; with
  ``save_crlf=False`` Dovecot stores LF endings, its own default.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from .ports import free_port
from .process import alive, all_pids, kill_all, proc_stat

__all__ = [
    "DEFAULT_MAILBOXES",
    "DEFAULT_OVER_QUOTA",
    "FILLER_FOLDER",
    "OVER_QUOTA_LIMIT",
    "DovecotError",
    "DovecotLmtp",
    "DovecotNotInstalled",
    "dovecot_version",
]

DEFAULT_MAILBOXES: tuple[str, ...] = (
    "alice@example.test",
    "bob@example.test",
    "carol@example.org",
    "dave@example.test",
)
DEFAULT_OVER_QUOTA: frozenset[str] = frozenset({"dave@example.test"})

#: Quota limit of an ``over_quota`` mailbox, in bytes.
OVER_QUOTA_LIMIT = 1024
#: Maildir++ folder holding the message that puts an ``over_quota`` mailbox over its limit;
#: it is not INBOX, so :meth:`DovecotLmtp.messages` does not return it.
FILLER_FOLDER = ".Filler"
_FILLER_SIZE = 2 * OVER_QUOTA_LIMIT

#: Password of every test mailbox in the passdb (LMTP itself does not authenticate).
PASSWORD = "secret"

HOST = "127.0.0.1"
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
_LMTP_EXECUTABLES = ("/usr/lib/dovecot/lmtp", "/usr/libexec/dovecot/lmtp")
# After its services are gone the master normally exits within 0.1 s, sometimes only
# after a 1 s timer; it has nothing left to do by then, so it is not waited for longer.
_MASTER_EXIT_WAIT = 0.3
_STARTUP_FAILURE = re.compile(r"(?m)(?:^|: )(?:Fatal|Error|Panic): ")
_INSTALL_HINT = "install it with `make peers` (scripts/install-debian-peers.sh)"

_CONFIG_TEMPLATE = """\
# Generated by tests/peers/dovecot.py for one private test instance. Dovecot 2.3 syntax.
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = {instance_name}
log_path = {log_path}
protocols = lmtp
listen = {host}
ssl = no
hostname = {hostname}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {mail_uid}
mail_location = maildir:{mail_root}/%d/%n
mail_save_crlf = {save_crlf}
mail_plugins = $mail_plugins quota
lmtp_rcpt_check_quota = yes
quota_full_tempfail = {quota_tempfail}
recipient_delimiter = +

passdb {{
  driver = passwd-file
  args = scheme=PLAIN {users_file}
}}
userdb {{
  driver = passwd-file
  args = {users_file}
}}

plugin {{
  quota = maildir:User quota
}}

service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {port}
  }}
  unix_listener {socket_path} {{
    mode = 0666
  }}
}}
{nonroot_config}
{extra_config}
"""

# Without root, services cannot chroot (anvil is the only chrooted one LMTP needs).
_NONROOT_CONFIG = """\
service anvil {
  chroot =
}
"""


class DovecotError(RuntimeError):
    """The private Dovecot instance could not be configured, started or stopped."""


class DovecotNotInstalled(DovecotError):
    """Dovecot (dovecot-core + dovecot-lmtpd) is not installed on this machine."""


class _PortInUse(DovecotError):
    """The LMTP port was taken between choosing it and Dovecot binding it."""


@dataclass(frozen=True)
class _Binaries:
    dovecot: str
    doveconf: str


@dataclass(frozen=True)
class _Account:
    address: str
    quota_bytes: int | None
    filler: bool

    @property
    def local(self) -> str:
        return self.address.rsplit("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]


def _normalise(address: str) -> str:
    address = address.strip().lower()
    if address.count("@") != 1 or address.startswith("@") or address.endswith("@"):
        raise ValueError(f"not a mailbox address: {address!r}")
    return address


@functools.cache
def _binaries() -> _Binaries:
    dovecot = shutil.which("dovecot", path=_SEARCH_PATH)
    doveconf = shutil.which("doveconf", path=_SEARCH_PATH)
    if dovecot is None or doveconf is None:
        raise DovecotNotInstalled(f"dovecot/doveconf not found (dovecot-core): {_INSTALL_HINT}")
    if not any(os.access(p, os.X_OK) for p in _LMTP_EXECUTABLES):
        raise DovecotNotInstalled(f"Dovecot's lmtp service is missing (dovecot-lmtpd): "
                                  f"{_INSTALL_HINT}")
    return _Binaries(dovecot=dovecot, doveconf=doveconf)


@functools.cache
def dovecot_version() -> tuple[int, ...]:
    """Return the installed Dovecot version, e.g. ``(2, 3, 19, 1)``."""
    out = subprocess.run(
        [_binaries().dovecot, "--version"], capture_output=True, text=True, check=False,
        timeout=10,
    )
    match = re.match(r"(\d+(?:\.\d+)+)", out.stdout.strip())
    if out.returncode != 0 or match is None:
        raise DovecotError(f"cannot tell Dovecot's version: {out.stdout}{out.stderr}")
    return tuple(int(part) for part in match.group(1).split("."))


def _proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(
            errors="replace"
        )
    except OSError:
        return ""


def _probe_lhlo(host: str, port: int, timeout: float) -> list[str]:
    """Connect, read the greeting, send LHLO and return the 250 reply lines.

    Raises ``OSError`` when the port does not accept or the server does not answer as an
    LMTP server should.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        try:
            greeting = _read_reply(reader)
            if not greeting[0].startswith("220"):
                raise OSError(f"LMTP greeting was {greeting!r}")
            sock.sendall(b"LHLO probe.mailedge.test\r\n")
            lhlo = _read_reply(reader)
            if not lhlo[0].startswith("250"):
                raise OSError(f"LHLO answered {lhlo!r}")
            sock.sendall(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                _read_reply(reader)
            return lhlo
        finally:
            reader.close()


def _read_reply(reader: IO[bytes]) -> list[str]:
    lines: list[str] = []
    while True:
        line = reader.readline(1024)
        if not line:
            raise OSError(f"connection closed after {lines!r}")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return lines


_running: weakref.WeakSet[DovecotLmtp] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:  # a test run that dies between start and teardown
    for instance in list(_running):
        with contextlib.suppress(Exception):
            instance.stop()


class DovecotLmtp:
    """One private Dovecot instance that accepts LMTP on 127.0.0.1 and on a UNIX socket.

    ``mailboxes`` are the addresses that exist; every other address gets 550 5.1.1.
    ``over_quota`` mailboxes get a quota of :data:`OVER_QUOTA_LIMIT` bytes and start with
    a larger message in their :data:`FILLER_FOLDER`, so Dovecot refuses them at RCPT.
    ``quotas`` gives other mailboxes a storage limit in bytes (they start empty, so a
    message that does not fit is refused after DATA). Addresses named only in
    ``over_quota`` or ``quotas`` are added to ``mailboxes``.

    ``extra_config`` is appended to the generated dovecot.conf (later settings win).
    ``workdir`` defaults to a new temporary directory, removed by :meth:`close`.
    """

    def __init__(
        self,
        mailboxes: Iterable[str] = DEFAULT_MAILBOXES,
        *,
        over_quota: Iterable[str] = (),
        quotas: Mapping[str, int] | None = None,
        quota_tempfail: bool = False,
        save_crlf: bool = True,
        port: int | None = None,
        hostname: str = "dovecot.test",
        extra_config: str = "",
        workdir: Path | None = None,
        startup_timeout: float = 10.0,
        debug: bool = False,
    ) -> None:
        over = {_normalise(a) for a in over_quota}
        limits = {_normalise(a): int(n) for a, n in (quotas or {}).items()}
        if any(n <= 0 for n in limits.values()):
            raise ValueError("quota limits must be positive byte counts")
        addresses = dict.fromkeys([*(_normalise(a) for a in mailboxes), *over, *limits])
        self._accounts = tuple(
            _Account(
                address=a,
                quota_bytes=OVER_QUOTA_LIMIT if a in over else limits.get(a),
                filler=a in over,
            )
            for a in addresses
        )
        self._quota_tempfail = quota_tempfail
        self._save_crlf = save_crlf
        self._auto_port = port is None
        self._port = port if port is not None else free_port(HOST)
        self._hostname = hostname
        self._extra_config = extra_config
        if debug:
            self._extra_config = "mail_debug = yes\nauth_debug = yes\n" + extra_config
        self._startup_timeout = startup_timeout
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix="mailedge-dovecot-")).resolve()
        self._instance_name = f"mailedge-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._tree_ready = False
        self.startup_seconds: float | None = None
        """How long the last :meth:`start` took, from exec to a 250 answer to LHLO."""

    # ----------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        """The address the LMTP TCP listener is bound to (always 127.0.0.1)."""
        return HOST

    @property
    def port(self) -> int:
        """The LMTP TCP port on :attr:`host`."""
        return self._port

    @property
    def socket_path(self) -> Path:
        """The LMTP UNIX socket (mode 0666)."""
        return self._workdir / "lmtp.sock"

    @property
    def maildir_root(self) -> Path:
        """The directory holding ``<domain>/<local>`` Maildirs."""
        return self._workdir / "mail"

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self._workdir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "dovecot.log"

    @property
    def instance_name(self) -> str:
        return self._instance_name

    @property
    def pid(self) -> int | None:
        """PID of the running master process, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def mailboxes(self) -> tuple[str, ...]:
        return tuple(a.address for a in self._accounts)

    # ------------------------------------------------------------------- mailboxes

    def maildir(self, address: str) -> Path:
        """The Maildir (INBOX) of ``address``; a ``+detail`` is dropped as Dovecot does."""
        local, domain = _normalise(address).rsplit("@", 1)
        return self.maildir_root / domain / local.split("+", 1)[0]

    def messages(self, address: str) -> list[bytes]:
        """The raw files in the INBOX of ``address`` (new/ and cur/), sorted by file name."""
        box = self.maildir(address)
        files = [
            entry
            for sub in ("new", "cur")
            if (box / sub).is_dir()
            for entry in (box / sub).iterdir()
            if entry.is_file()
        ]
        return [entry.read_bytes() for entry in sorted(files, key=lambda p: p.name)]

    def processes(self) -> list[int]:
        """PIDs of the live processes of this instance: the master and its services."""
        members = self._instance_processes(self._proc.pid if self._proc is not None else 0)
        return sorted(pid for pid, start in members.items() if alive(pid, start))

    def log_text(self) -> str:
        """Everything Dovecot logged so far (handy in assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the instance and return once LHLO on :attr:`port` is answered with 250."""
        if self._proc is not None:
            raise DovecotError("this Dovecot instance is already running")
        binaries = _binaries()
        version = dovecot_version()
        if version[:2] != (2, 3):
            raise DovecotError(
                f"tests/peers/dovecot.py writes Dovecot 2.3 configuration; installed is "
                f"{'.'.join(map(str, version))} (2.4 changed the syntax)"
            )
        self._prepare_tree()
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._write_config()
            self._check_config(binaries)
            try:
                self._launch(binaries)
            except _PortInUse:
                if attempt == attempts - 1:
                    raise
                self._port = free_port(HOST)
            else:
                _running.add(self)
                return

    def stop(self, grace: float = 0.5) -> None:
        """Stop the instance; return once none of its processes is left.

        SIGTERM to the master and to its service processes; services still running after
        ``grace`` seconds get SIGKILL; then the log process gets SIGTERM (it would
        otherwise linger about a second); the master is reaped, or SIGKILLed if it still
        lingers with no service left (it then has nothing left to do but remove
        master.pid, which we do); finally anything of this instance that survived is
        SIGKILLed.
        """
        proc = self._proc
        if proc is None:
            return
        members = self._instance_processes(proc.pid)
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self._shut_services(proc.pid, members, grace)
            try:
                proc.wait(timeout=_MASTER_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        finally:
            self._proc = None
            _running.discard(self)
        self._kill_leftovers(members)
        with contextlib.suppress(FileNotFoundError):
            (self._workdir / "base" / "master.pid").unlink()

    def restart(self) -> None:
        """Stop and start again on the same port and socket, keeping the mailboxes."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the instance and remove its working directory (if this object made it)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> DovecotLmtp:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc is not None else "stopped"
        return f"<DovecotLmtp {self._instance_name} {HOST}:{self._port} {state}>"

    # ------------------------------------------------------------------- internals

    @property
    def _title_prefix(self) -> str:
        """Service processes of this instance are titled ``dovecot-<instance_name>/<name>``."""
        return f"dovecot-{self._instance_name}/"

    def _users(self) -> tuple[pwd.struct_passwd, str, str, str]:
        """(mail user, internal user, internal group, login user) for this machine.

        As root: Debian's ``mail`` user owns the Maildirs (a userdb uid of 0 is refused),
        and Dovecot's own ``dovecot``/``dovenull`` users run its services. As anyone
        else: everything runs as the current user, which Dovecot supports.
        """
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return me, me.pw_name, grp.getgrgid(os.getegid()).gr_name, me.pw_name
        names = {p.pw_name: p for p in pwd.getpwall()}
        mail = next((names[n] for n in ("mail", "dovenull", "nobody") if n in names), None)
        if mail is None:
            raise DovecotError("no non-root user (mail, dovenull, nobody) to own the Maildirs")
        internal = "dovecot" if "dovecot" in names else mail.pw_name
        group = grp.getgrgid(names[internal].pw_gid).gr_name
        login = "dovenull" if "dovenull" in names else internal
        return mail, internal, group, login

    def _prepare_tree(self) -> None:
        if self._tree_ready:
            return
        mail_user, _, _, _ = self._users()
        uid, gid = mail_user.pw_uid, mail_user.pw_gid
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._workdir.chmod(0o711)
        for sub in ("base", "state"):
            (self._workdir / sub).mkdir(exist_ok=True)
        root = self.maildir_root
        root.mkdir(exist_ok=True)
        root.chmod(0o755)
        lines = []
        for account in self._accounts:
            box = self.maildir(account.address)
            extra = ""
            if account.quota_bytes is not None:
                extra = f"userdb_quota_rule=*:storage={account.quota_bytes}B"
            if account.filler:
                self._write_filler(box)
            lines.append(f"{account.address}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{box}::{extra}\n")
        users = self._workdir / "users"
        users.write_text("".join(lines))
        users.chmod(0o644)
        for dirpath, _dirnames, filenames in os.walk(root):
            os.chown(dirpath, uid, gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid)
        self._tree_ready = True

    @staticmethod
    def _write_filler(box: Path) -> None:
        folder = box / FILLER_FOLDER
        for sub in ("new", "cur", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "maildirfolder").touch()
        body = b"Subject: quota filler\r\n\r\n"
        body += b"x" * (_FILLER_SIZE - len(body) - 2) + b"\r\n"
        (folder / "cur" / f"1000000000.M1P1.filler,S={len(body)}:2,S").write_bytes(body)

    def _write_config(self) -> None:
        mail_user, internal, group, login = self._users()
        text = _CONFIG_TEMPLATE.format(
            base_dir=self._workdir / "base",
            state_dir=self._workdir / "state",
            instance_name=self._instance_name,
            log_path=self.log_path,
            host=HOST,
            hostname=self._hostname,
            internal_user=internal,
            internal_group=group,
            login_user=login,
            mail_uid=mail_user.pw_uid,
            mail_root=self.maildir_root,
            save_crlf="yes" if self._save_crlf else "no",
            quota_tempfail="yes" if self._quota_tempfail else "no",
            users_file=self._workdir / "users",
            port=self._port,
            socket_path=self.socket_path,
            nonroot_config=_NONROOT_CONFIG if os.geteuid() != 0 else "",
            extra_config=self._extra_config,
        )
        self.config_path.write_text(text)

    def _check_config(self, binaries: _Binaries) -> None:
        result = subprocess.run(
            [binaries.doveconf, "-c", str(self.config_path), "-n"],
            capture_output=True, text=True, check=False, timeout=30,
        )
        if result.returncode != 0:
            raise DovecotError(
                f"doveconf rejected {self.config_path}:\n{result.stderr.strip()}\n"
                f"--- generated configuration ---\n{self.config_path.read_text()}"
            )

    def _launch(self, binaries: _Binaries) -> None:
        out_path = self._workdir / "dovecot.out"
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out_offset = out_path.stat().st_size if out_path.exists() else 0
        started = time.monotonic()
        with open(out_path, "ab") as out:
            proc = subprocess.Popen(
                [binaries.dovecot, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._workdir,
            )
        self._proc = proc
        deadline = started + self._startup_timeout
        last_error: OSError | None = None
        while True:
            ready = False
            try:
                _probe_lhlo(HOST, self._port, timeout=1.0)
                ready = True
            except OSError as exc:
                last_error = exc
            returncode = proc.poll()
            diagnostics = self._new_output(log_offset, out_offset)
            # Checked after a good LHLO too: a service may have failed beside lmtp.
            if returncode is not None or _STARTUP_FAILURE.search(diagnostics):
                self.stop()
                message = (
                    f"dovecot -c {self.config_path} failed to start "
                    f"(exit status {proc.returncode}):\n{diagnostics.strip()}"
                )
                if self._auto_port and "Address already in use" in diagnostics:
                    raise _PortInUse(message)
                raise DovecotError(message)
            if ready:
                self.startup_seconds = time.monotonic() - started
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise DovecotError(
                    f"Dovecot did not answer LHLO on {HOST}:{self._port} within "
                    f"{self._startup_timeout}s (last error: {last_error}):\n"
                    f"{self._new_output(log_offset, out_offset).strip()}"
                )
            time.sleep(0.005)

    def _new_output(self, log_offset: int, out_offset: int) -> str:
        parts = []
        for path, offset in ((self._workdir / "dovecot.out", out_offset),
                             (self.log_path, log_offset)):
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    parts.append(fh.read().decode(errors="replace"))
            except FileNotFoundError:
                continue
        return "".join(parts)

    def _instance_processes(self, master_pid: int) -> dict[int, int]:
        """PID -> start time of the master, its descendants and anything with our title."""
        title_prefix = self._title_prefix
        stats = {pid: st for pid in all_pids() if (st := proc_stat(pid)) is not None}
        children: dict[int, list[int]] = {}
        for pid, (_state, ppid, _sid, _start) in stats.items():
            children.setdefault(ppid, []).append(pid)
        members: dict[int, int] = {}
        todo = [master_pid]
        while todo:
            pid = todo.pop()
            if pid in stats and pid not in members:
                members[pid] = stats[pid][3]
                todo.extend(children.get(pid, ()))
        for pid, (_state, _ppid, _sid, start) in stats.items():
            if pid not in members and _proc_title(pid).startswith(title_prefix):
                members[pid] = start
        return members

    def _shut_services(self, master_pid: int, members: dict[int, int], grace: float) -> None:
        """After the master got SIGTERM: see its services gone, the log process last."""
        log_title = self._title_prefix + "log"
        logs = {p: s for p, s in members.items() if _proc_title(p) == log_title}
        others = {p: s for p, s in members.items() if p != master_pid and p not in logs}
        # The master leaves idle service processes (an lmtp process after its client
        # quit) to notice on their own that it is gone, which takes up to seconds; they
        # do not handle SIGTERM, so it ends them at once, as shutdown_clients would.
        for pid, start in others.items():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while others := {p: s for p, s in others.items() if alive(p, s)}:
            if time.monotonic() >= deadline:
                for pid in others:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5  # SIGKILL cannot be ignored
            time.sleep(0.002)
        for pid, start in logs.items():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def _kill_leftovers(self, members: dict[int, int]) -> None:
        """SIGKILL whatever of this instance outlived its master, and wait until it is gone."""
        # Anything of this instance that appeared since (named by its title) counts too.
        title_prefix = self._title_prefix
        for pid in all_pids():
            st = proc_stat(pid)
            if st is not None and pid not in members and _proc_title(pid).startswith(
                title_prefix
            ):
                members[pid] = st[3]
        leftovers = kill_all(members)
        if leftovers:
            raise DovecotError(f"processes of {self._instance_name} survived SIGKILL: "
                               f"{sorted(leftovers)}")
