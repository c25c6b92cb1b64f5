"""The embedded tenant directory (tenant_api_client/filedir.py).

Lookups take parts already normalised by the caller (lowercase A-label domain,
case-folded local part without subaddress); keys in the file are normalised the same
way, so whatever case the operator wrote still matches.
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest

from tenant_api_client.errors import DirectoryError, InvalidData
from tenant_api_client.filedir import (
    FileDirectory,
    normalise_domain,
    normalise_local,
    parse_tenants,
)
from tenant_api_client.models import Recipient, Tenant, TenantPolicy, Unknown

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "tenants.toml"


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems(text: str) -> dict[str, tuple[int | None, str]]:
    """parse_tenants must refuse `text`; its problems as {key: (line, message)}."""
    with pytest.raises(InvalidData) as info:
        parse_tenants(toml(text))
    found = {key: (line, message) for key, line, message in info.value.problems}
    assert len(found) == len(info.value.problems), info.value.problems
    return found


def located(text: str) -> set[tuple[str, int | None]]:
    """parse_tenants must refuse `text`; its problems as {(key, line)}."""
    with pytest.raises(InvalidData) as info:
        parse_tenants(toml(text))
    return {(key, line) for key, line, _ in info.value.problems}


def write(path: Path, text: str, *, mtime: float | None = None) -> None:
    path.write_text(toml(text), encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))


SMALL = """
    [tenant.acme]
    domains = ["example.test"]
    mailboxes = ["alice@example.test"]
    """


# -- the example file ---------------------------------------------------------------------


def test_example_file_parses() -> None:
    snapshot = parse_tenants(EXAMPLE.read_text(encoding="utf-8"))
    assert snapshot.domains["example.test"] == "acme"
    for address in ("alice@example.test", "bob@example.test"):
        recipient = snapshot.recipients[address]
        assert recipient.tenant == "acme"
        assert recipient.address == address
        assert recipient.kind == "mailbox"
        assert not recipient.disabled and not recipient.over_quota
    acme = snapshot.tenants["acme"]
    assert acme.domains == ("example.test",)
    assert acme.policy.rejected_copies in ("quarantine", "discard")


async def test_example_file_lookups() -> None:
    directory = FileDirectory(EXAMPLE)
    try:
        alice = await directory.lookup_recipient("alice", "example.test")
        assert isinstance(alice, Recipient)
        assert (alice.address, alice.tenant) == ("alice@example.test", "acme")
        bob = await directory.lookup_recipient("bob", "example.test")
        assert isinstance(bob, Recipient) and bob.tenant == "acme"
        assert directory.ready()
    finally:
        await directory.aclose()


# -- lookups --------------------------------------------------------------------------------


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    write(path, """
        [tenant.acme]
        name = "Acme"
        domains = ["example.test", "Example.NET"]
        mailboxes = ["alice@example.test", "Bob@EXAMPLE.net"]

        [tenant.acme.mailbox."Carol@Example.Test"]
        storage = "[::1]:24"
        over_quota = true

        [tenant.acme.mailbox."dan@example.test"]
        disabled = true
        storage = "unix:/run/dovecot/lmtp"

        [tenant.acme.policy]
        max_message_size = 1000000
        rejected_copies = "discard"

        [tenant.globex]
        domains = ["bücher.example"]
        mailboxes = ["Jürgen@BÜCHER.example"]
        """)
    return path


async def test_lookup_known_recipient(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    found = await directory.lookup_recipient("alice", "example.test")
    assert found == Recipient(address="alice@example.test", tenant="acme")


async def test_lookup_unknown_mailbox_of_hosted_domain(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    found = await directory.lookup_recipient("mallory", "example.test")
    assert found == Unknown(tenant="acme")
    assert isinstance(found, Unknown) and found.domain_hosted


async def test_lookup_foreign_domain(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    found = await directory.lookup_recipient("alice", "example.com")
    assert found == Unknown(tenant=None)
    assert isinstance(found, Unknown) and not found.domain_hosted


async def test_file_keys_are_normalised(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    bob = await directory.lookup_recipient("bob", "example.net")
    assert isinstance(bob, Recipient)
    assert (bob.address, bob.tenant) == ("bob@example.net", "acme")
    carol = await directory.lookup_recipient("carol", "example.test")
    assert carol == Recipient(address="carol@example.test", tenant="acme", storage="[::1]:24",
                              over_quota=True)
    # lookups are exact on the normalised key: the caller normalises, not the directory
    assert await directory.lookup_recipient("Carol", "example.test") == Unknown(tenant="acme")


async def test_mailbox_flags_and_storage(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    dan = await directory.lookup_recipient("dan", "example.test")
    assert dan == Recipient(address="dan@example.test", tenant="acme",
                            storage="unix:/run/dovecot/lmtp", disabled=True)


async def test_idn_domain_stored_as_a_label(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    a_label = "xn--bcher-kva.example"
    assert normalise_domain("BÜCHER.example") == a_label
    found = await directory.lookup_recipient(normalise_local("Jürgen"), a_label)
    assert found == Recipient(address=f"jürgen@{a_label}", tenant="globex")
    # the U-label is not a lookup key
    assert await directory.lookup_recipient("jürgen", "bücher.example") == Unknown(tenant=None)
    globex = await directory.tenant("globex")
    assert globex is not None and globex.domains == (a_label,)


async def test_tenant_and_policy(tenants_file: Path) -> None:
    directory = FileDirectory(tenants_file)
    assert await directory.tenant("acme") == Tenant(
        id="acme", name="Acme", domains=("example.test", "example.net"),
        policy=TenantPolicy(max_message_size=1_000_000, rejected_copies="discard"))
    globex = await directory.tenant("globex")
    assert globex is not None and globex.policy == TenantPolicy()
    assert await directory.tenant("initech") is None


def test_normalisation_helpers() -> None:
    assert normalise_domain("Example.TEST.") == "example.test"
    assert normalise_local("ALICE") == "alice"
    assert normalise_local("Stra\u00dfe") == "strasse"  # case folding, not lower()
    assert normalise_local("e\u0301") == "\u00e9"  # NFC


def test_missing_file_is_invalid_data(tmp_path: Path) -> None:
    with pytest.raises(InvalidData) as info:
        FileDirectory(tmp_path / "absent.toml")
    assert info.value.problems[0][0] == "(file)"
    assert isinstance(info.value, DirectoryError)


# -- validation: every problem, with its line ------------------------------------------------


def test_syntax_error_has_line() -> None:
    found = problems("""
        [tenant.acme]
        domains = ["example.test"
        mailboxes = []
        """)
    assert list(found) == ["(syntax)"]
    assert found["(syntax)"][0] in (2, 3)


def test_duplicate_domain_across_tenants() -> None:
    found = problems("""
        [tenant.acme]
        domains = ["example.test"]

        [tenant.globex]
        domains = ["example.org",
                   "EXAMPLE.test"]
        """)
    assert list(found) == ["tenant.globex.domains"]
    line, message = found["tenant.globex.domains"]
    assert line == 6
    assert "acme" in message


def test_mailbox_outside_tenant_domains() -> None:
    found = problems("""
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["alice@example.test"]

        [tenant.globex]
        domains = ["example.org"]
        mailboxes = ["dave@example.org",
                     "alice@example.test"]
        """)
    assert list(found) == ["tenant.globex.mailbox.alice@example.test"]
    line, message = found["tenant.globex.mailbox.alice@example.test"]
    assert line == 8
    assert "example.test" in message


def test_unknown_keys() -> None:
    found = problems("""
        tenants = 1

        [tenant.acme]
        domains = ["example.test"]
        mailbox_list = ["x@example.test"]

        [tenant.acme.mailbox."carol@example.test"]
        quota = 10

        [tenant.acme.policy]
        spam = "reject"
        """)
    assert {key: line for key, (line, _) in found.items()} == {
        "tenants": 1,
        "tenant.acme.mailbox_list": 5,
        "tenant.acme.mailbox.carol@example.test.quota": 8,
        "tenant.acme.policy.spam": 11,
    }
    assert all("unknown" in message for _, message in found.values())


def test_bad_storage_endpoint() -> None:
    found = problems("""
        # storage = "127.0.0.1:24" would be fine
        [tenant.acme]
        domains = ["example.test"]

        [tenant.acme.mailbox."carol@example.test"]
        storage = "dovecot"
        """)
    assert list(found) == ["tenant.acme.mailbox.carol@example.test.storage"]
    assert found["tenant.acme.mailbox.carol@example.test.storage"][0] == 6


def test_non_bool_flags() -> None:
    found = problems("""
        [tenant.acme]
        domains = ["example.test"]
        # disabled and over_quota take true or false

        [tenant.acme.mailbox."carol@example.test"]
        disabled = "yes"
        over_quota = 1
        """)
    assert {key: line for key, (line, _) in found.items()} == {
        "tenant.acme.mailbox.carol@example.test.disabled": 6,
        "tenant.acme.mailbox.carol@example.test.over_quota": 7,
    }


def test_all_problems_reported_together_with_lines() -> None:
    found = located("""
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["alice@example.test", "eve@elsewhere.test"]
        colour = "blue"

        [tenant.acme.mailbox."bob@example.test"]
        storage = 24
        over_quota = "no"

        [tenant.acme.policy]
        max_message_size = -1
        rejected_copies = "bounce"

        [tenant.globex]
        domains = ["example.test"]
        """)
    assert found == {
        ("tenant.acme.colour", 4),
        ("tenant.acme.mailbox.eve@elsewhere.test", 3),
        ("tenant.acme.mailbox.bob@example.test.storage", 7),
        ("tenant.acme.mailbox.bob@example.test.over_quota", 8),
        ("tenant.acme.policy.max_message_size", 11),
        ("tenant.acme.policy.rejected_copies", 12),
        ("tenant.globex.domains", 15),  # example.test already belongs to acme
        ("tenant.globex.domains", 14),  # so globex is left without a domain
    }


def test_more_structural_problems() -> None:
    found = located("""
        [tenant."bad id!"]
        domains = ["example.test"]

        [tenant.nodomain]
        name = "no domains"

        [tenant.acme]
        domains = "example.org"
        mailboxes = ["nobody", "x@example.org", "X@Example.org"]
        """)
    assert found == {
        ("tenant.bad id!", 1),
        ("tenant.nodomain.domains", 4),
        ("tenant.acme.domains", 8),  # not a list
        ("tenant.acme.domains", 7),  # so acme is left without a domain
        # and no mailbox can be placed; each is reported
        ("tenant.acme.mailbox.nobody", 9),
        ("tenant.acme.mailbox.x@example.org", 9),
        ("tenant.acme.mailbox.X@Example.org", 9),
    }


def test_mailbox_listed_twice() -> None:
    found = problems("""
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["carol@example.test"]

        [tenant.acme.mailbox."Carol@example.test"]
        disabled = true
        """)
    assert list(found) == ["tenant.acme.mailbox.Carol@example.test"]
    line, message = found["tenant.acme.mailbox.Carol@example.test"]
    assert line == 5
    assert "twice" in message


def test_render_names_source_and_lines() -> None:
    with pytest.raises(InvalidData) as info:
        parse_tenants(toml("""
            [tenant.acme]
            domains = ["example.test"]
            colour = 1
            """))
    assert info.value.render("tenants.toml") == (
        "tenants.toml: line 3: tenant.acme.colour: unknown key")


# -- reload ---------------------------------------------------------------------------------


async def test_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write(path, SMALL, mtime=1_000_000)
    directory = FileDirectory(path, reload_interval=0)
    assert await directory.lookup_recipient("bob", "example.test") == Unknown(tenant="acme")

    write(path, """
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["alice@example.test", "bob@example.test"]
        """, mtime=1_000_010)
    bob = await directory.lookup_recipient("bob", "example.test")
    assert isinstance(bob, Recipient) and bob.tenant == "acme"


async def test_no_reload_before_interval(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write(path, SMALL, mtime=1_000_000)
    directory = FileDirectory(path, reload_interval=3600)
    write(path, """
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["alice@example.test", "bob@example.test"]
        """, mtime=1_000_010)
    assert await directory.lookup_recipient("bob", "example.test") == Unknown(tenant="acme")


async def test_broken_reload_keeps_old_data(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tenants.toml"
    write(path, SMALL, mtime=1_000_000)
    directory = FileDirectory(path, reload_interval=0)

    write(path, """
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["alice@example.test", "bob@elsewhere.test"]
        """, mtime=1_000_010)
    with caplog.at_level(logging.ERROR, logger="tenant_api_client.filedir"):
        alice = await directory.lookup_recipient("alice", "example.test")
        again = await directory.lookup_recipient("alice", "example.test")
    assert isinstance(alice, Recipient) and alice == again
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "a broken file is reported once, not on every lookup"
    assert "bob@elsewhere.test" in errors[0].getMessage()

    # once fixed, the new data is taken
    write(path, """
        [tenant.acme]
        domains = ["example.test"]
        mailboxes = ["bob@example.test"]
        """, mtime=1_000_020)
    assert await directory.lookup_recipient("alice", "example.test") == Unknown(tenant="acme")
    assert isinstance(await directory.lookup_recipient("bob", "example.test"), Recipient)


async def test_deleted_file_keeps_old_data(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write(path, SMALL, mtime=1_000_000)
    directory = FileDirectory(path, reload_interval=0)
    path.unlink()
    assert isinstance(await directory.lookup_recipient("alice", "example.test"), Recipient)
