"""The peers of the full inbound chain case (issue 6, case 1), and its signed messages.

One set of peers serves both systems, started privately on 127.0.0.1 with the project's
test helpers (tests/peers/): NSD, rspamd and clamd. Both systems pay the peers alike, so
their CPU is measured apart from each system's own.

* **NSD** (:class:`tests.peers.dns.AuthoritativeDNS`) serves the zones the bench
  generates: ``client.example`` (the sender's domain: A and MX 127.0.0.1, SPF
  ``v=spf1 ip4:127.0.0.0/8 -all``, a DKIM key at ``bench._domainkey`` and DMARC
  ``p=reject``, strict alignment), ``bench.example`` (the receiving domain) and
  ``0.0.127.in-addr.arpa`` (PTR of 127.0.0.1 → ``client.example``). Names outside these
  zones get REFUSED at once (NSD is not recursive), so nothing waits for a timeout.
  mailedge's [dns] and rspamd's resolver both point at it.
* **clamd** (:class:`tests.peers.clamd.Clamd`) with the EICAR test signatures only, its
  TemporaryDirectory on tmpfs (/dev/shm) as on a tuned mail host: clamd writes every
  stream to a file there, and on this machine's ext4 (mounted with ``discard``) file
  creation and deletion cost it 0.5 to 1 ms per message, more under load.
* **rspamd** (:class:`tests.peers.rspamd.Rspamd`) with ``count = workers`` normal workers
  and its **proxy worker in milter mode** for Postfix (``milter = yes``, forwarding to
  the same normal workers: ``upstream "local" { default = yes; hosts = normal }``), so
  both systems are scanned by the same worker processes. Changes to the stock config:
  - ``check_local = true`` (override.d/options.inc): the load comes from 127.0.0.1,
    which rspamd's SPF, DMARC, hfilter and once_received modules would otherwise skip
    as a local address; with it rspamd checks Postfix's mail as it would a remote
    sender's.
  - antivirus module → this clamd (``type = clamav``, the whole message, not only
    attachments: ``scan_mime_parts = false``), so mail through Postfix is virus-scanned
    by rspamd.
  - ``http_headers`` off (the test helper turns it on). mailedge's intended deployment
    has it on, so that rspamd takes mailedge's SPF, DKIM and DMARC results from request
    headers instead of checking again; but in rspamd 3.4 the module's conditions end in
    ``return false`` whether or not the headers are present, so with it on rspamd never
    runs SPF_CHECK, DKIM_CHECK or DMARC_CALLBACK for anyone, and Postfix's mail would go
    unchecked. Instead a settings rule matching mailedge's ``MTA-Name`` request header
    switches off, for mailedge's requests only, what mailedge did already
    (:data:`MAILEDGE_DOES_ITSELF`: SPF_CHECK, DKIM_CHECK, DMARC_CALLBACK and CLAM_VIRUS):
    the same work saved as with the headers, minus those symbols' small scores. clamd
    thus sees every message exactly once from either system (the bench checks clamd's
    and rspamd's scan counts per run).
  - ``sign_local = false`` for dkim_signing and arc: 127.0.0.1 counts as local, and
    rspamd would otherwise try to sign every message as outbound mail.

Messages: one per size, From ``sender@client.example``, signed once by
gateway/dkim_signer.py with an RSA-2048 key (relaxed/relaxed) whose public half is in
the zone; the load client sends that file as is.
"""

from __future__ import annotations

import email.utils
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.dkim_signer import DkimSigner
from tests.peers.clamd import Clamd
from tests.peers.dns import AuthoritativeDNS
from tests.peers.ports import free_port
from tests.peers.rspamd import Rspamd

SENDER_DOMAIN = "client.example"
SENDER = f"sender@{SENDER_DOMAIN}"
SELECTOR = "bench"
#: What rspamd sees as MTA-Name from mailedge (config/bench/mailedge-chain.toml hostname).
MAILEDGE_HOSTNAME = "mx.bench.example"
#: rspamd's checks switched off for mailedge's requests: mailedge did them already.
#: Where clamd's TemporaryDirectory goes when this tmpfs exists (Debian mounts it).
TMPFS = Path("/dev/shm")
MAILEDGE_DOES_ITSELF = ("CLAM_VIRUS", "SPF_CHECK", "DKIM_CHECK", "DMARC_CALLBACK")

_TEXT = ("the quick brown fox jumps over a lazy dog while our gateway checks every "
         "message for spam viruses and forged senders before it reaches the mailbox "
         "of its tenant and nothing in this text is meant to look like spam at all")
_WORDS = _TEXT.split(" ")


def rsa_key_pem(bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def plain_message(size: int, to: str, subject: str = "Benchmark message") -> bytes:
    """A text/plain message of about `size` bytes of body, 72-column lines, CRLF."""
    head = (f"From: Bench Sender <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(localtime=False)}\r\n"
            f"Message-ID: <{int(time.time() * 1000)}.{size}@{SENDER_DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n").encode()
    lines, length, i = [], 0, 0
    while length < size:
        line: list[str] = []
        while sum(len(w) + 1 for w in line) < 70:
            line.append(_WORDS[i % len(_WORDS)])
            i += 1
        text = " ".join(line).encode() + b"\r\n"
        lines.append(text)
        length += len(text)
    return head + b"".join(lines)


class ChainPeers:
    """NSD, clamd and rspamd for the chain case, all in `workdir`; `stop()` ends them."""

    def __init__(self, workdir: Path, rspamd_workers: int) -> None:
        self.workdir = workdir
        self.key_pem = rsa_key_pem()
        self.signer = DkimSigner(self.key_pem, SELECTOR, SENDER_DOMAIN)
        self.dns = AuthoritativeDNS(workdir / "nsd")
        self.clamd: Clamd | None = None
        self.clamd_tmp = workdir / "clamd-tmp"
        self.rspamd: Rspamd | None = None
        self.milter_port = free_port()
        self._rspamd_workers = rspamd_workers

    def start(self) -> ChainPeers:
        zone = self.dns.zone(SENDER_DOMAIN)
        zone.add("@", "A", "127.0.0.1").add("@", "MX", "10 @").add("mail", "A", "127.0.0.1")
        zone.txt("@", "v=spf1 ip4:127.0.0.0/8 -all")
        zone.txt(f"{SELECTOR}._domainkey", self.signer.dns_record())
        zone.txt("_dmarc", f"v=DMARC1; p=reject; adkim=s; aspf=s; rua=mailto:dmarc@{SENDER_DOMAIN}")
        bench = self.dns.zone("bench.example")
        bench.add("@", "MX", "10 mx").add("mx", "A", "127.0.0.1")
        bench.add("postfix", "A", "127.0.0.1")
        self.dns.zone("0.0.127.in-addr.arpa").add("1", "PTR", f"{SENDER_DOMAIN}.")
        self.dns.start()
        # clamd writes each stream (and each MIME part it extracts) to a file in its
        # TemporaryDirectory: on tmpfs, as a mail host would run it, not the disk.
        self.clamd_tmp = Path(tempfile.mkdtemp(prefix="mailedge-bench-clamd-",
                                               dir=TMPFS if TMPFS.is_dir() else None))
        self.clamd = Clamd(self.workdir / "clamd", max_threads=4,
                           temp_dir=self.clamd_tmp).start()
        normal_port = free_port()
        proxy = (f'bind_socket = "127.0.0.1:{self.milter_port}";\ncount = 1;\nmilter = yes;\n'
                 "timeout = 120s;\n"
                 'upstream "local" {\n  default = yes;\n'
                 f'  hosts = "127.0.0.1:{normal_port}";\n}}\n')
        antivirus = ("clamav {\n  type = \"clamav\";\n  symbol = \"CLAM_VIRUS\";\n"
                     f'  servers = "127.0.0.1:{self.clamd.port}";\n'
                     "  scan_mime_parts = false;\n  action = \"reject\";\n"
                     "  log_clean = true;\n}\n")
        hostname_re = MAILEDGE_HOSTNAME.replace(".", "\\\\.")
        disabled = ", ".join(f'"{name}"' for name in MAILEDGE_DOES_ITSELF)
        settings = ("mailedge_checked_these_itself {\n  priority = high;\n"
                    f'  request_header = {{\n    "MTA-Name" = "^{hostname_re}$";\n  }}\n'
                    f"  apply {{\n    symbols_disabled = [{disabled}];\n  }}\n}}\n")
        self.rspamd = Rspamd(
            self.workdir / "rspamd", nameservers=[self.dns.address],
            workers=self._rspamd_workers, dns_timeout=2.0, unix_socket=True,
            local={"antivirus.conf": antivirus, "settings.conf": settings,
                   # Off: in rspamd 3.4 it disables SPF, DKIM and DMARC for every
                   # request, with or without the headers (its conditions end in
                   # `return false`), so Postfix's mail would go unchecked.
                   "http_headers.conf": "enabled = false;\n",
                   # Mail from 127.0.0.1 counts as local: no outbound signing attempts.
                   "dkim_signing.conf": "sign_local = false;\n",
                   "arc.conf": "sign_local = false;\n"},
            override={"worker-proxy.inc": proxy, "options.inc": "check_local = true;\n"},
            port=normal_port)
        self.rspamd.start()
        if self.rspamd.port != normal_port:
            raise RuntimeError("rspamd moved its normal worker; the milter proxy would "
                               "forward to the wrong port (rerun)")
        return self

    def signed_message(self, size: int, to: str) -> bytes:
        message = plain_message(size, to)
        return self.signer.sign(message) + message

    def cpu_roots(self) -> dict[str, int]:
        """Name -> root PID of each peer (its process tree is what it costs)."""
        roots = {}
        if self.rspamd is not None and self.rspamd.pid is not None:
            roots["rspamd"] = self.rspamd.pid
        if self.clamd is not None and self.clamd.pid is not None:
            roots["clamd"] = self.clamd.pid
        if self.dns.pid is not None:
            roots["nsd"] = self.dns.pid
        return roots

    def rspamd_scanned(self) -> int:
        """Messages rspamd has scanned so far (controller /stat)."""
        assert self.rspamd is not None
        with urllib.request.urlopen(self.rspamd.controller_url + "/stat", timeout=10) as r:
            return int(json.loads(r.read())["scanned"])

    def rspamd_log_size(self) -> int:
        assert self.rspamd is not None
        return self.rspamd.log_path.stat().st_size if self.rspamd.log_path.exists() else 0

    def rspamd_tasks_since(self, offset: int) -> list[str]:
        """rspamd's log line of each message scanned since `offset` (its file size then)."""
        assert self.rspamd is not None
        with self.rspamd.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if "rspamd_task_write_log" in line]


    def clamd_scans(self) -> int:
        return len(self.clamd.scans()) if self.clamd is not None else 0

    def stop(self) -> None:
        for peer in (self.rspamd, self.clamd):
            if peer is not None:
                try:
                    peer.stop()
                except Exception as exc:  # keep stopping the others
                    print(f"bench: stopping {peer!r}: {exc}")
        self.dns.stop()
        shutil.rmtree(self.clamd_tmp, ignore_errors=True)
