"""lmtp.pool's pure parts (Endpoint, argument checks) and the lmtp package's surface."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import lmtp
from lmtp import DEFAULT_LMTP_PORT, Endpoint, LmtpPool, LmtpPools, LmtpTimeouts


@pytest.mark.parametrize(
    ("text", "endpoint", "string"),
    [
        ("127.0.0.1:24", Endpoint("127.0.0.1", 24), "127.0.0.1:24"),
        ("127.0.0.1", Endpoint("127.0.0.1", DEFAULT_LMTP_PORT), "127.0.0.1:24"),
        ("  10.0.0.5:2424 \n", Endpoint("10.0.0.5", 2424), "10.0.0.5:2424"),
        ("[::1]:24", Endpoint("::1", 24), "[::1]:24"),
        ("[2001:db8::7]:10024", Endpoint("2001:db8::7", 10024), "[2001:db8::7]:10024"),
        ("[::1]", Endpoint("::1", 24), "[::1]:24"),
        ("[fe80::1%eth0]:24", Endpoint("fe80::1%eth0", 24), "[fe80::1%eth0]:24"),
        ("mail-store-3.internal:24", Endpoint("mail-store-3.internal", 24), None),
        ("localhost:65535", Endpoint("localhost", 65535), None),
        ("unix:/run/dovecot/lmtp", Endpoint(path="/run/dovecot/lmtp"), None),
        ("unix:relative/sock", Endpoint(path="relative/sock"), None),
        (
            "/var/run/dovecot/lmtp",
            Endpoint(path="/var/run/dovecot/lmtp"),
            "unix:/var/run/dovecot/lmtp",
        ),
    ],
)
def test_endpoint_parse(text: str, endpoint: Endpoint, string: str | None) -> None:
    parsed = Endpoint.parse(text)
    assert parsed == endpoint
    assert str(parsed) == (string if string is not None else text.strip())
    assert Endpoint.parse(str(parsed)) == parsed
    assert parsed.is_unix is (endpoint.path is not None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix:",
        ":24",
        "host:",
        "host:0",
        "host:65536",
        "host:-1",
        "host:24x",
        "host:\uff12\uff14",  # non-ASCII (fullwidth) digits
        "::1:24",  # IPv6 needs brackets
        "::1",
        "[::1",
        "[::1]24",
        "[not-v6]:24",
        "[127.0.0.1]:24",
        "a b:24",
        "user@host:24",
        "host/path:24",
    ],
)
def test_endpoint_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_endpoint_default_port_is_configurable() -> None:
    assert Endpoint.parse("h", default_port=2003) == Endpoint("h", 2003)
    assert Endpoint.parse("h:24", default_port=2003) == Endpoint("h", 24)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"host": "h"},
        {"port": 24},
        {"host": "", "port": 24},
        {"host": "h", "port": 0},
        {"path": ""},
        {"path": "/s", "host": "h"},
        {"path": "/s", "port": 24},
    ],
)
def test_endpoint_invariants(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Endpoint(**kwargs)  # type: ignore[arg-type]


def test_endpoint_is_hashable_and_frozen() -> None:
    ep = Endpoint.parse("h:24")
    assert {ep: 1}[Endpoint("h", 24)] == 1
    with pytest.raises(AttributeError):
        ep.port = 25  # type: ignore[misc]


def test_pool_arguments() -> None:
    with pytest.raises(ValueError):
        LmtpPool("h:24", max_connections=0)
    with pytest.raises(ValueError):
        LmtpPool("::1:24")
    pool = LmtpPool(Endpoint("h", 24), max_connections=2, timeouts=LmtpTimeouts(data=5.0))
    assert pool.endpoint == Endpoint("h", 24)
    assert pool.timeouts.data == 5.0 and pool.timeouts.connect == LmtpTimeouts().connect
    assert (pool.open_connections, pool.idle_connections, pool.in_use) == (0, 0, 0)
    assert "h:24" in repr(pool)


def test_pools_share_settings_and_key_by_endpoint() -> None:
    pools = LmtpPools(max_connections=3, idle_timeout=5.0, lhlo_name="gw.test")
    a = pools.get("h:24")
    assert pools.get("h") is a  # default port: same backend
    assert pools.get(Endpoint("h", 24)) is a
    assert pools.get("h:25") is not a
    assert (a.max_connections, a.idle_timeout, a.lhlo_name) == (3, 5.0, "gw.test")
    assert len(pools) == 2


# -- the package surface ------------------------------------------------------------

LMTP_DIR = Path(lmtp.__file__).parent


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(lmtp) if not name.startswith("_")}
    modules = {"client", "dotstuff", "errors", "pool", "protocol", "replies"}
    assert sorted(lmtp.__all__) == sorted(public - modules)
    assert lmtp.__all__ == sorted(lmtp.__all__, key=lambda n: (not n.isupper(), n))


@pytest.mark.parametrize("path", sorted(LMTP_DIR.glob("*.py")), ids=lambda p: p.name)
def test_lmtp_imports_only_the_standard_library_and_itself(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                continue  # relative: lmtp itself
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", (
                f"{path.name} imports {name}"
            )


@pytest.mark.parametrize("path", sorted(LMTP_DIR.glob("*.py")), ids=lambda p: p.name)
def test_every_module_has_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring) > 80
