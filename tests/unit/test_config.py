"""Node configuration loading and validation (gateway/config.py).

The example `config/mailedge.toml` is the documentation of every key, so these tests
keep it and the settings dataclasses in step, and check that validation reports every
problem at once, each with its dotted key and the line it came from.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

from gateway.config import (
    AdminSettings,
    ConfigError,
    ConfigProblem,
    HostPort,
    InboundSettings,
    NodeSettings,
    PipelineSettings,
    QueueSettings,
    Settings,
    StorageSettings,
    load_config,
    parse_host_port,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "mailedge.toml"

# The tables of the file, and the dataclass each one fills (Settings.<table>).
TABLES: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
    if f.name != "path"
}

_HEADER = re.compile(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^(?:#\s*)?([A-Za-z0-9_]+)\s*=")


def documented_keys(text: str) -> dict[str, set[str]]:
    """Per table, every key written in the file, including commented-out `# key = ...`."""
    keys: dict[str, set[str]] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        header = _HEADER.match(line)
        if header:
            table = header.group(1)
            keys.setdefault(table, set())
            continue
        key = _KEY.match(line)
        if key:
            keys.setdefault(table, set()).add(key.group(1))
    return keys


def write(tmp_path: Path, text: str, name: str = "mailedge.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


def by_key(problems: list[ConfigProblem]) -> dict[str, ConfigProblem]:
    found = {p.key: p for p in problems}
    assert len(found) == len(problems), f"one problem per key expected: {problems}"
    return found


# -- the example file ---------------------------------------------------------------------


def test_example_file_loads() -> None:
    settings = load_config(EXAMPLE)
    assert settings.path == EXAMPLE
    assert settings.node.name == "mx1"
    assert settings.inbound.listen == (HostPort("127.0.0.1", 2525),)
    assert settings.inbound.hostname == "mx1.example.test"
    assert settings.inbound.max_recipients >= 100
    assert settings.inbound.tls_cert is not None and settings.inbound.tls_key is not None
    assert settings.storage.lmtp is None  # commented out in the example
    assert settings.storage.maildir is not None
    assert settings.outbound.smarthost is None  # "" means: look up MX
    assert settings.admin.listen == HostPort("127.0.0.1", 8025)
    assert settings.queue.retry_min <= settings.queue.retry_max
    assert settings.pipeline.for_stage("message") == ("size_limit", "dkim", "arc", "dmarc", "spf")
    assert settings.pipeline.for_stage("mail") == ("spf",)


def test_example_file_tables_match_settings() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert set(data) == set(TABLES)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_example_keys_exist_in_settings(table: str) -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(TABLES[table])}
    unknown = set(data.get(table, {})) - fields
    assert not unknown, f"[{table}] keys in the example but not in {TABLES[table].__name__}"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_setting_is_documented_in_example(table: str) -> None:
    documented = documented_keys(EXAMPLE.read_text(encoding="utf-8")).get(table, set())
    # Private fields (a leading underscore) are derived data, not settings.
    fields = {f.name for f in dataclasses.fields(TABLES[table]) if not f.name.startswith("_")}
    missing = fields - documented
    assert not missing, f"[{table}] settings missing from the example (as key or # key =)"
    # and nothing is documented (even commented out) that the node does not read
    assert documented <= fields, f"[{table}] documents unknown keys {documented - fields}"


def test_documented_keys_helper_sees_commented_keys() -> None:
    keys = documented_keys("[a]\nx = 1\n# y = 2\n# prose, not a key\n[b]\n#z=3\n")
    assert keys == {"a": {"x", "y"}, "b": {"z"}}


def test_defaults_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty file is a valid configuration: every key has a default. Relative default
    # paths are resolved against the working directory, like paths in the file.
    monkeypatch.chdir(tmp_path)
    settings = load_config(write(tmp_path, ""))
    assert settings.node == NodeSettings(spool_dir=tmp_path / "var" / "spool")
    assert settings.tenants.file == tmp_path / "config" / "tenants.toml"
    assert settings.inbound == InboundSettings()
    assert settings.queue == QueueSettings()
    assert settings.admin == AdminSettings()
    assert settings.pipeline == PipelineSettings()
    assert settings.storage.lmtp is None
    assert settings.storage.maildir is not None


# -- unknown keys and tables ----------------------------------------------------------------


def test_unknown_key_reported_with_dotted_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [node]
        name = "mx2"

        [inbound]
        hostname = "mx2.example.test"
        max_recipent = 500
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbound.max_recipent"
    assert "unknown" in problem.message
    assert problem.line == 6
    assert str(problem).startswith("line 6: inbound.max_recipent:")


def test_unknown_table_reported_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [node]
        name = "mx2"

        [inbund]
        hostname = "mx2.example.test"
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbund"
    assert "unknown" in problem.message
    assert problem.line == 4


def test_unknown_top_level_key_reported_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        # a comment
        fsync = false

        [node]
        name = "mx2"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("fsync", 2)


def test_unknown_subtable_reported_with_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        hostname = "mx2.example.test"

        [queue]
        retry_min = 10

        [inbound.tls]
        cert = "x.pem"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("inbound.tls", 7)


def test_unknown_dotted_keys_reported_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        queue.retry_min = 5
        queue.colour = "red"

        [ inbound ]
        hostname = "mx2.example.test"
        tls.cert = "x.pem"
        """)
    found = by_key(problems_of(path))
    assert {key: p.line for key, p in found.items()} == {"queue.colour": 2, "inbound.tls": 6}


def test_same_key_name_in_other_table_is_not_confused(tmp_path: Path) -> None:
    # `listen` exists in [inbound] and [admin]; the bad one is the admin one.
    path = write(tmp_path, """
        [inbound]
        listen = ["127.0.0.1:2525"]

        [admin]
        listen = "localhost"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("admin.listen", 5)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [node]
        name = "MX 1"
        log_level = "verbose"
        colour = "blue"

        [inbound]
        max_recipients = 10
        max_connections = "many"
        listen = ["nowhere"]

        [queue]
        retry_min = 600
        retry_max = 60

        [bogus]
        x = 1
        """)
    found = by_key(problems_of(path))
    assert {key: p.line for key, p in found.items()} == {
        "node.name": 2,
        "node.log_level": 3,
        "node.colour": 4,
        "inbound.max_recipients": 7,
        "inbound.max_connections": 8,
        "inbound.listen": 9,
        "queue.retry_max": 13,
        "bogus": 15,
    }


def test_render_lists_every_problem_with_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        max_recipients = 10
        max_connections = 0
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    rendered = info.value.render().splitlines()
    assert len(rendered) == 2
    assert rendered[0].startswith(f"{path}: line 2: inbound.max_recipients: ")
    assert rendered[1].startswith(f"{path}: line 3: inbound.max_connections: ")


# -- types and values -------------------------------------------------------------------------


def test_string_where_integer_expected(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        max_message_size = "35M"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("inbound.max_message_size", 2)
    assert "integer" in problem.message and "str" in problem.message


def test_bool_where_integer_expected(tmp_path: Path) -> None:
    # bool is a subclass of int in Python; the loader must not take `true` as 1.
    path = write(tmp_path, """
        [queue]
        max_active = true
        """)
    (problem,) = problems_of(path)
    assert problem.key == "queue.max_active"
    assert "boolean" in problem.message


def test_bool_where_number_expected(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [queue]
        retry_min = false
        """)
    (problem,) = problems_of(path)
    assert problem.key == "queue.retry_min"
    assert "boolean" in problem.message


def test_float_where_integer_expected(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        max_recipients = 150.5
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbound.max_recipients"
    assert "integer" in problem.message


def test_integer_accepted_where_number_expected(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [queue]
        retry_min = 5
        retry_max = 7.5
        """)
    queue = load_config(path).queue
    assert queue.retry_min == 5.0 and isinstance(queue.retry_min, float)
    assert queue.retry_max == 7.5


def test_non_bool_where_bool_expected(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [queue]
        fsync = 1
        """)
    (problem,) = problems_of(path)
    assert problem.key == "queue.fsync"
    assert "true or false" in problem.message


@pytest.mark.parametrize("value", [0, 1, 99])
def test_max_recipients_below_100_refused(tmp_path: Path, value: int) -> None:
    path = write(tmp_path, f"""
        [inbound]
        max_recipients = {value}
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("inbound.max_recipients", 2)
    assert "100" in problem.message


def test_max_recipients_100_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        max_recipients = 100
        """)
    assert load_config(path).inbound.max_recipients == 100


@pytest.mark.parametrize("address", [
    "127.0.0.1",  # no port
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "::1:25",  # IPv6 without brackets
    "[::1]",
    ":25",
    "host name:25",
])
def test_bad_listen_address(tmp_path: Path, address: str) -> None:
    path = write(tmp_path, f"""
        [inbound]
        listen = ["127.0.0.1:2525", "{address}"]
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("inbound.listen", 2)
    assert address in problem.message


def test_listen_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        listen = "127.0.0.1:25"
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbound.listen"
    assert "list" in problem.message


def test_empty_listen_refused(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        listen = []
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbound.listen"


def test_listen_addresses_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        listen = ["0.0.0.0:25", "[::]:25", "mx.example.test:2525"]
        """)
    assert load_config(path).inbound.listen == (
        HostPort("0.0.0.0", 25), HostPort("::", 25), HostPort("mx.example.test", 2525))


def test_parse_host_port() -> None:
    assert parse_host_port("[2001:db8::1]:587") == HostPort("2001:db8::1", 587)
    assert str(HostPort("2001:db8::1", 587)) == "[2001:db8::1]:587"
    assert str(HostPort("127.0.0.1", 25)) == "127.0.0.1:25"
    assert parse_host_port("127.0.0.1:99999") is None
    assert parse_host_port("") is None


def test_admin_listen_empty_disables(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [admin]
        listen = ""
        """)
    assert load_config(path).admin.listen is None


def test_tls_cert_without_key(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        hostname = "mx.example.test"
        tls_cert = "cert.pem"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("inbound.tls_cert", 3)
    assert "tls_key" in problem.message


def test_tls_key_without_cert(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        tls_key = "key.pem"
        """)
    (problem,) = problems_of(path)
    assert problem.key.startswith("inbound.tls_")
    assert problem.line is not None


def test_tls_pair_accepted_and_relative_paths_resolved(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, """
        [inbound]
        tls_cert = "tls/cert.pem"
        tls_key = "/etc/mailedge/key.pem"
        """)
    inbound = load_config(path).inbound
    assert inbound.tls_cert == tmp_path / "tls" / "cert.pem"
    assert inbound.tls_key == Path("/etc/mailedge/key.pem")


def test_retry_max_below_retry_min(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [queue]
        retry_min = 300
        retry_max = 60
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("queue.retry_max", 3)
    assert "retry_min" in problem.message


def test_retry_max_below_default_retry_min(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [queue]
        retry_max = 30
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("queue.retry_max", 2)


def test_proxy_protocol_networks(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [inbound]
        proxy_protocol_from = ["10.0.0.0/8", "2001:db8::1", "not-a-net"]
        """)
    (problem,) = problems_of(path)
    assert problem.key == "inbound.proxy_protocol_from"
    assert "not-a-net" in problem.message


def test_storage_needs_lmtp_or_maildir(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [storage]
        maildir = ""
        """)
    (problem,) = problems_of(path)
    assert problem.key == "storage"


def test_lmtp_without_maildir_disables_default_maildir(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [storage]
        lmtp = "unix:/run/dovecot/lmtp"
        """)
    storage = load_config(path).storage
    assert storage == StorageSettings(lmtp="unix:/run/dovecot/lmtp", maildir=None)


def test_bad_lmtp_endpoint(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [storage]
        lmtp = "dovecot"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("storage.lmtp", 2)


def test_pipeline_must_list_names(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [pipeline]
        message = ["size_limit", 3]
        rcpt = "size_limit"
        """)
    found = by_key(problems_of(path))
    assert set(found) == {"pipeline.message", "pipeline.rcpt"}
    assert found["pipeline.message"].line == 2
    assert found["pipeline.rcpt"].line == 3


def test_table_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, """
        node = "mx1"
        """)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == ("node", 1)


# -- file-level errors ------------------------------------------------------------------------


def test_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [node]
        name = "mx1"
        log_level = info
        """)
    (problem,) = problems_of(path)
    assert problem.key == "(syntax)"
    assert problem.line == 3


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    (problem,) = problems_of(path)
    assert problem.key == "(file)"
    assert "cannot read" in problem.message
    assert problem.line is None


def test_settings_are_frozen() -> None:
    settings = load_config(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.node.name = "other"  # type: ignore[misc]
