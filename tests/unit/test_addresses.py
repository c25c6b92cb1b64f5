"""Envelope path parsing and lookup normalisation (gateway/addresses.py)."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import (
    Address,
    AddressError,
    SMTPUTF8Required,
    parse_command_arg,
    parse_path,
    split_command_arg,
)

RCPT: dict[str, Any] = {"allow_null": False, "smtputf8": False}
RCPT8: dict[str, Any] = {"allow_null": False, "smtputf8": True}


def rcpt(arg: str, **kw: Any) -> Address:
    options = {**RCPT8, **kw}
    address = parse_path(arg, **options)
    assert address is not None
    return address


# ---------------------------------------------------------------------------------------
# Valid paths. SMTPUTF8 is on exactly when the argument is non-ASCII.


def case(
    arg: str,
    local: str,
    domain: str,
    key: str,
    *,
    quoted: bool = False,
    text: str | None = None,
    detail: str | None = None,
) -> Any:
    """One valid path: what it parses to; `text` defaults to 'local@domain'."""
    text = f"{local}@{domain}" if text is None else text
    return pytest.param(arg, local, domain, quoted, text, key, detail, id=arg)


ATEXT_ALL = "a!#$%&'*/=?^_`{|}~-z"

VALID = [
    # plain, case preserved as received, lookups lowercased
    case("<user@example.com>", "user", "example.com", "user@example.com"),
    case("<John.Doe@Example.COM>", "John.Doe", "Example.COM", "john.doe@example.com"),
    # bare address without brackets (lenient, like Postfix)
    case("user@example.com", "user", "example.com", "user@example.com"),
    # every atext character (RFC 5322 §3.2.3)
    case(f"<{ATEXT_ALL}@example.com>", ATEXT_ALL, "example.com", f"{ATEXT_ALL}@example.com"),
    # subaddress
    case("<User+Tag@example.com>", "User+Tag", "example.com", "user@example.com", detail="Tag"),
    case("<user+a+b@example.com>", "user+a+b", "example.com", "user@example.com", detail="a+b"),
    case("<user+@example.com>", "user+", "example.com", "user@example.com", detail=""),
    case("<+foo@example.com>", "+foo", "example.com", "+foo@example.com"),
    # source route, ignored (RFC 5321 §4.1.1.3, Appendix C)
    case("<@a.example,@b.example:user@c.example>", "user", "c.example", "user@c.example"),
    case("<@a.example:user@c.example>", "user", "c.example", "user@c.example"),
    # %-hack and bang paths are plain local parts
    case(
        "<user%other.example@example.test>",
        "user%other.example",
        "example.test",
        "user%other.example@example.test",
    ),
    case(
        "<other.example!user@example.test>",
        "other.example!user",
        "example.test",
        "other.example!user@example.test",
    ),
    # quoted local parts; text quotes again only when needed
    case(
        '<"user@other.example"@example.test>',
        "user@other.example",
        "example.test",
        "user@other.example@example.test",
        quoted=True,
        text='"user@other.example"@example.test',
    ),
    case('<"a b"@x.test>', "a b", "x.test", "a b@x.test", quoted=True, text='"a b"@x.test'),
    case(
        '<"a\\"b\\\\c"@x.test>',
        'a"b\\c',
        "x.test",
        'a"b\\c@x.test',
        quoted=True,
        text='"a\\"b\\\\c"@x.test',
    ),
    case('<"a>b"@x.test>', "a>b", "x.test", "a>b@x.test", quoted=True, text='"a>b"@x.test'),
    case('<"john"@x.test>', "john", "x.test", "john@x.test", quoted=True),
    case('<"\\j\\o\\h\\n"@x.test>', "john", "x.test", "john@x.test", quoted=True),
    case(
        '<".a..b."@x.test>',
        ".a..b.",
        "x.test",
        ".a..b.@x.test",
        quoted=True,
        text='".a..b."@x.test',
    ),
    case('<"Big+Tag"@x.test>', "Big+Tag", "x.test", "big@x.test", quoted=True, detail="Tag"),
    # address literals (RFC 5321 §4.1.3), canonical lookup form
    case("<user@[192.0.2.1]>", "user", "[192.0.2.1]", "user@[192.0.2.1]"),
    case("<u@[IPv6:2001:DB8:0:0::1]>", "u", "[IPv6:2001:DB8:0:0::1]", "u@[ipv6:2001:db8::1]"),
    case("<u@[ipv6:::ffff:192.0.2.1]>", "u", "[ipv6:::ffff:192.0.2.1]", "u@[ipv6:::ffff:c000:201]"),
    # domains: digits, inner hyphens, single label, A-labels
    case("<a@1-2.3com>", "a", "1-2.3com", "a@1-2.3com"),
    case("<a@localhost>", "a", "localhost", "a@localhost"),
    case("<a@XN--BCHER-KVA.example>", "a", "XN--BCHER-KVA.example", "a@xn--bcher-kva.example"),
    # SMTPUTF8 (RFC 6531)
    case("<Jöran@bücher.example>", "Jöran", "bücher.example", "jöran@xn--bcher-kva.example"),
    case("<用户@例子.测试>", "用户", "例子.测试", "用户@xn--fsqu00a.xn--0zwm56d"),
    case("<Straße@Bücher.Example>", "Straße", "Bücher.Example", "strasse@xn--bcher-kva.example"),
    case(
        '<"ü\u00a0x"@x.test>',
        "ü\u00a0x",
        "x.test",
        "ü\u00a0x@x.test",
        quoted=True,
        text='"ü\u00a0x"@x.test',
    ),
]


@pytest.mark.parametrize(("arg", "local", "domain", "quoted", "text", "key", "detail"), VALID)
def test_valid(
    arg: str,
    local: str,
    domain: str,
    quoted: bool,
    text: str,
    key: str,
    detail: str | None,
) -> None:
    smtputf8 = not arg.isascii()
    address = parse_path(arg, allow_null=False, smtputf8=smtputf8)
    assert address is not None
    assert (address.local, address.domain, address.quoted) == (local, domain, quoted)
    assert address.text == text
    assert address.lookup_key == key
    assert address.lookup_key == f"{address.lookup_local}@{address.lookup_domain}"
    assert address.detail == detail
    assert address.needs_smtputf8 is smtputf8
    # the canonical text is itself a valid path and means the same address
    assert parse_path(f"<{address.text}>", allow_null=False, smtputf8=smtputf8) == address


# ---------------------------------------------------------------------------------------
# Invalid paths: (arg, smtputf8, reason)

LONG_LABEL = "a" * 64

INVALID = [
    ("", False, "empty path"),
    ("<>", False, "null path not allowed"),
    ("<", False, "unterminated path"),
    ("<user@example.com", False, "unterminated path"),
    ("user@example.com>", False, "invalid character in domain"),
    ("<<user@example.com>>", False, "invalid character in local part"),
    ("<user>", False, "missing domain"),
    ("<user@>", False, "missing domain"),
    ("<@example.com>", False, "malformed source route"),
    ('<""@example.com>', False, "empty local part"),
    ('<"user">', False, "missing domain"),
    ('<"user"x@example.com>', False, "text after quoted local part"),
    ('<"unterminated@example.com>', False, "malformed quoted local part"),
    ('<"a\\\u00e9"@example.com>', True, "malformed quoted local part"),  # quoted-pair is ASCII
    ("<a@b@c>", False, "more than one '@'"),
    ("<user@other.example@example.test>", False, "more than one '@'"),
    ("<a b@example.com>", False, "invalid character in local part"),
    ("<a,b@example.com>", False, "invalid character in local part"),
    ("<a(b)@example.com>", False, "invalid character in local part"),
    ('<a"b"@example.com>', False, "invalid character in local part"),
    ("<.user@example.com>", False, "misplaced dot"),
    ("<user.@example.com>", False, "misplaced dot"),
    ("<us..er@example.com>", False, "misplaced dot"),
    ("<user@example.com.>", False, "trailing dot in domain"),
    ("<user@.example.com>", False, "empty label in domain"),
    ("<user@example..com>", False, "empty label in domain"),
    ("<user@-example.com>", False, "starts or ends with '-'"),
    ("<user@example-.com>", False, "starts or ends with '-'"),
    (f"<user@{LONG_LABEL}.com>", False, "longer than 63 octets"),
    ("<user@exa_mple.com>", False, "invalid character in domain"),
    ("<user@exa mple.com>", False, "invalid character in domain"),
    ("<user@example.com%other>", False, "invalid character in domain"),
    ("<user@example!com>", False, "invalid character in domain"),
    ("<user@[192.0.2.256]>", False, "invalid IPv4 address literal"),
    ("<user@[192.0.2.01]>", False, "invalid IPv4 address literal"),
    ("<user@[192.0.2]>", False, "unsupported address literal"),
    ("<user@[IPv6:2001:db8::g]>", False, "invalid IPv6 address literal"),
    ("<user@[IPv6:fe80::1%eth0]>", False, "invalid IPv6 address literal"),
    ("<user@[2001:db8::1]>", False, "unsupported address literal"),
    ("<user@[x-tag:foo]>", False, "unsupported address literal"),
    ("<user@[192.0.2.1>", False, "unterminated address literal"),
    ("<@[192.0.2.1]:user@example.com>", False, "address literal in source route"),
    ("<@a.example,b.example:user@example.com>", False, "malformed source route"),
    ("<@a.example user@example.com>", False, "malformed source route"),
    ("<@a..example:user@example.com>", False, "empty label in domain"),
    ("@a.example:user@example.com", False, "source route without angle brackets"),
    ("<user@example.com> SIZE=1", False, "unterminated path"),  # parse_path: the path alone
    # control characters anywhere, quoted or not
    ("<us\x00er@example.com>", False, "control character"),
    ("<user@example.com\r\n>", False, "control character"),
    ('<"a\nb"@example.com>', False, "control character"),
    ('<"a\\\rb"@example.com>', False, "control character"),
    ("<us\x7fer@example.com>", False, "control character"),
    ("<us\x85er@example.com>", True, "control character"),
    ("<us\u2028er@example.com>", True, "control character"),
    ("<us\ud800er@example.com>", True, "control character"),
    ("<us\ter@example.com>", False, "control character"),
    # non-ASCII needs SMTPUTF8; non-ASCII whitespace is not atext
    ("<jöran@example.com>", False, "non-ASCII address without SMTPUTF8"),
    ("<user@bücher.example>", False, "non-ASCII address without SMTPUTF8"),
    ('<"ö"@example.com>', False, "non-ASCII address without SMTPUTF8"),
    ("<a\u00a0b@example.com>", True, "invalid character in local part"),
    ("<a\u3000b@example.com>", True, "invalid character in local part"),
    # U-labels that cannot become A-labels
    ("<user@bü_cher.example>", True, "cannot be converted"),
    ("<user@bü cher.example>", True, "cannot be converted"),
    ("<user@ü\u3002example>", True, "cannot be converted"),  # ideographic full stop
    ("<user@\u00ad.example>", True, "cannot be converted"),  # maps to nothing
    ("<user@-ü.example>", True, "starts or ends with '-'"),
    ("<user@xn--ü.example>", True, "cannot be converted"),
    (f"<user@{'ü' * 60}.example>", True, "cannot be converted"),  # A-label > 63
]


@pytest.mark.parametrize(("arg", "smtputf8", "reason"), INVALID)
def test_invalid(arg: str, smtputf8: bool, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(arg, allow_null=False, smtputf8=smtputf8)
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_non_ascii_without_smtputf8_is_its_own_error() -> None:
    """RFC 6531 §3.5 wants 553 5.6.7 for this, so the caller must be able to tell."""
    with pytest.raises(SMTPUTF8Required):
        parse_path("<jöran@example.com>", **RCPT)
    with pytest.raises(AddressError) as info:
        parse_path("<a b@example.com>", **RCPT)
    assert not isinstance(info.value, SMTPUTF8Required)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------
# The destination is always the domain after the '@' that ends the local part.


@pytest.mark.parametrize(
    ("arg", "local", "lookup_domain"),
    [
        ("<user%other.example@example.test>", "user%other.example", "example.test"),
        ("<other.example!user@example.test>", "other.example!user", "example.test"),
        ("<a%b%c.example@Example.Test>", "a%b%c.example", "example.test"),
        ('<"user@other.example"@example.test>', "user@other.example", "example.test"),
        ('<"user%other@x!y"@example.test>', "user%other@x!y", "example.test"),
        ('<"@other.example:user"@example.test>', "@other.example:user", "example.test"),
        ("<@other.example:user@example.test>", "user", "example.test"),
        ("<@a.example,@other.example:user%x@example.test>", "user%x", "example.test"),
    ],
)
def test_destination_is_the_final_domain(arg: str, local: str, lookup_domain: str) -> None:
    address = rcpt(arg)
    assert address.local == local
    assert address.lookup_domain == lookup_domain


def test_quoted_local_part_is_quoted_again() -> None:
    address = rcpt('<"user@other.example"@example.test>')
    assert address.quoted
    assert address.text == '"user@other.example"@example.test'
    assert rcpt(address.text) == address


# ---------------------------------------------------------------------------------------
# Null path, Postmaster, bare addresses


def test_null_path() -> None:
    assert parse_path("<>", allow_null=True, smtputf8=False) is None
    with pytest.raises(AddressError, match="null path"):
        parse_path("<>", allow_null=False, smtputf8=False)
    with pytest.raises(AddressError, match="empty path"):
        parse_path("", allow_null=True, smtputf8=False)


@pytest.mark.parametrize("arg", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "Postmaster"])
def test_bare_postmaster(arg: str) -> None:
    address = parse_path(arg, allow_null=False, smtputf8=False, allow_bare_postmaster=True)
    assert address == Address(local="Postmaster", domain="")
    assert address is not None
    assert address.text == "Postmaster"
    assert address.lookup_local == "postmaster"
    assert address.lookup_domain == ""
    assert address.lookup_key == "postmaster@"
    with pytest.raises(AddressError, match="missing domain"):
        parse_path(arg, allow_null=False, smtputf8=False)


def test_bare_postmaster_is_only_postmaster() -> None:
    for arg in ["<abuse>", '<"Postmaster">', "<postmaster+x>"]:
        with pytest.raises(AddressError, match="missing domain"):
            parse_path(arg, allow_null=False, smtputf8=False, allow_bare_postmaster=True)
    postmaster = rcpt("<Postmaster@Example.com>", allow_bare_postmaster=True)
    assert postmaster.lookup_key == "postmaster@example.com"


def test_domainless_address_must_be_postmaster() -> None:
    with pytest.raises(AddressError, match="missing domain"):
        Address(local="abuse", domain="")


def test_bare_and_bracketed_agree() -> None:
    assert rcpt("Jo+x@Example.com") == rcpt("<Jo+x@Example.com>")
    assert rcpt('"a b"@example.com') == rcpt('<"a b"@example.com>')


# ---------------------------------------------------------------------------------------
# Lengths (RFC 5321 §4.5.3.1)


def test_local_part_length() -> None:
    assert rcpt(f"<{'a' * 64}@example.com>").local == "a" * 64
    with pytest.raises(AddressError, match="local part longer than 64 octets"):
        rcpt(f"<{'a' * 65}@example.com>")
    # octets, not characters
    assert rcpt(f"<{'é' * 32}@example.com>").local == "é" * 32
    with pytest.raises(AddressError, match="local part longer than 64 octets"):
        rcpt(f"<{'é' * 33}@example.com>")
    # measured on the canonical form: superfluous escapes do not count, needed quotes do
    escaped = '"' + "\\a" * 64 + '"'
    assert rcpt(f"<{escaped}@example.com>").local == "a" * 64
    with pytest.raises(AddressError, match="local part longer than 64 octets"):
        rcpt(f'<"{" " * 63}"@example.com>')


def _domain_of(octets: int) -> str:
    """A valid domain of exactly `octets` characters, in labels of up to 63."""
    domain = ".".join(["d" * 63] * 5)[:octets]
    if domain.endswith("."):
        domain = domain[:-2] + ".d"
    assert len(domain) == octets
    return domain


def test_path_length() -> None:
    local = "a" * 64
    fits = _domain_of(256 - len(local) - 3)
    assert len(f"<{local}@{fits}>") == 256
    assert rcpt(f"<{local}@{fits}>").domain == fits
    assert rcpt(f"{local}@{fits}").domain == fits  # bare: the brackets count all the same
    too_long = fits[:-1] + "dd"
    with pytest.raises(AddressError, match="path longer than 256 octets"):
        rcpt(f"<{local}@{too_long}>")
    with pytest.raises(AddressError, match="path longer than 256 octets"):
        rcpt(f"{local}@{too_long}")
    # a source route counts too
    with pytest.raises(AddressError, match="path longer than 256 octets"):
        rcpt(f"<@r.example:{local}@{fits}>")


def test_domain_length() -> None:
    assert Address("a", _domain_of(255)).lookup_domain == _domain_of(255)
    with pytest.raises(AddressError, match="domain longer than 255 octets"):
        Address("a", _domain_of(256))


def test_label_length() -> None:
    assert rcpt(f"<a@{'b' * 63}.example>").domain == "b" * 63 + ".example"


# ---------------------------------------------------------------------------------------
# Normalisation for lookups (DESIGN.md "Normalised lookups")


@pytest.mark.parametrize(
    ("arg", "lookup_local", "detail"),
    [
        ("<USER@example.com>", "user", None),
        ("<Ünïcode@example.com>", "ünïcode", None),
        ("<\u00e9@example.com>", "\u00e9", None),  # NFC é
        ("<e\u0301@example.com>", "\u00e9", None),  # NFD é -> NFC
        ("<E\u0301+Tag@example.com>", "\u00e9", "Tag"),
        ("<Straße@example.com>", "strasse", None),  # casefold, not lower
        ("<STRASSE@example.com>", "strasse", None),
        ("<ΣΊΣΥΦΟΣ@example.com>", "σίσυφοσ", None),
        ("<user+tag@example.com>", "user", "tag"),
        ("<user+Tag+More@example.com>", "user", "Tag+More"),
        ("<+foo@example.com>", "+foo", None),
        ("<+foo+bar@example.com>", "+foo+bar", None),
        ("<user+@example.com>", "user", ""),
        ('<"A B+c"@example.com>', "a b", "c"),
        ('<"E\u0301 x"@example.com>', "\u00e9 x", None),
    ],
)
def test_lookup_local(arg: str, lookup_local: str, detail: str | None) -> None:
    address = rcpt(arg)
    assert address.lookup_local == lookup_local
    assert address.detail == detail


def test_nfc_and_nfd_forms_look_up_alike() -> None:
    nfc = rcpt("<Andr\u00e9@example.com>")
    nfd = rcpt("<Andre\u0301@example.com>")
    assert nfc.local != nfd.local  # kept as received
    assert nfc.lookup_key == nfd.lookup_key == "andr\u00e9@example.com"


@pytest.mark.parametrize(
    ("separators", "arg", "lookup_local", "detail"),
    [
        ("-", "<user-tag@example.com>", "user", "tag"),
        ("-", "<user+tag@example.com>", "user+tag", None),
        ("+-", "<user-a+b@example.com>", "user", "a+b"),
        ("+-", "<user+a-b@example.com>", "user", "a-b"),
        ("+-", "<-user+a@example.com>", "-user+a", None),
        ("", "<user+tag@example.com>", "user+tag", None),
    ],
)
def test_separators(separators: str, arg: str, lookup_local: str, detail: str | None) -> None:
    address = rcpt(arg, separators=separators)
    assert address.separators == separators
    assert address.lookup_local == lookup_local
    assert address.detail == detail


@pytest.mark.parametrize(
    ("domain", "lookup_domain"),
    [
        ("Example.COM", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example", "xn--bcher-kva.example"),
        ("bu\u0308cher.example", "xn--bcher-kva.example"),  # NFD input
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("münchen.bücher.example", "xn--mnchen-3ya.xn--bcher-kva.example"),
        # IDNA 2003 (stdlib codec) limitation: ß is mapped; IDNA 2008 would keep it
        ("straße.example", "strasse.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
    ],
)
def test_lookup_domain(domain: str, lookup_domain: str) -> None:
    address = rcpt(f"<user@{domain}>")
    assert address.domain == domain
    assert address.lookup_domain == lookup_domain


def test_equality_ignores_quoting_but_not_separators() -> None:
    assert rcpt('<"john"@example.com>') == rcpt("<john@example.com>")
    assert hash(rcpt('<"john"@example.com>')) == hash(rcpt("<john@example.com>"))
    assert rcpt("<a@example.com>", separators="-") != rcpt("<a@example.com>")
    assert rcpt("<A@example.com>") != rcpt("<a@example.com>")  # as received differs
    assert rcpt("<A@example.com>").lookup_key == rcpt("<a@example.com>").lookup_key


def test_needs_smtputf8() -> None:
    assert not rcpt("<a@example.com>").needs_smtputf8
    assert rcpt("<ö@example.com>").needs_smtputf8
    assert rcpt("<a@bücher.example>").needs_smtputf8
    assert not rcpt("<a@xn--bcher-kva.example>").needs_smtputf8


def test_address_is_immutable() -> None:
    address = rcpt("<a@example.com>")
    with pytest.raises(AttributeError):
        address.local = "b"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Command argument: path plus ESMTP parameters (RFC 5321 §4.1.2 Mail-parameters)


@pytest.mark.parametrize(
    ("arg", "text", "params"),
    [
        ("<a@example.com>", "a@example.com", []),
        ("<a@example.com> SIZE=123", "a@example.com", ["SIZE=123"]),
        ("<a@example.com> SIZE=123 BODY=8BITMIME", "a@example.com", ["SIZE=123", "BODY=8BITMIME"]),
        (
            "<a@example.com>  SMTPUTF8   BODY=8BITMIME ",
            "a@example.com",
            ["SMTPUTF8", "BODY=8BITMIME"],
        ),
        ("<a@example.com> AUTH=<>", "a@example.com", ["AUTH=<>"]),
        (
            "<a@example.com> ORCPT=rfc822;a+2Bb@example.com",
            "a@example.com",
            ["ORCPT=rfc822;a+2Bb@example.com"],
        ),
        ("<a@example.com> NOTIFY=SUCCESS,FAILURE", "a@example.com", ["NOTIFY=SUCCESS,FAILURE"]),
        ('<"a> b"@example.com> SIZE=1', '"a> b"@example.com', ["SIZE=1"]),
        ("a@example.com SIZE=1", "a@example.com", ["SIZE=1"]),
        ('"a b"@example.com SIZE=1', '"a b"@example.com', ["SIZE=1"]),
        ("<@r.example:a@example.com> X-FOO", "a@example.com", ["X-FOO"]),
    ],
)
def test_command_arg(arg: str, text: str, params: list[str]) -> None:
    address, got = parse_command_arg(arg, allow_null=False, smtputf8=False)
    assert address is not None
    assert address.text == text
    assert got == params


def test_command_arg_null_sender_with_params() -> None:
    assert parse_command_arg("<> SIZE=10 BODY=7BIT", allow_null=True, smtputf8=False) == (
        None,
        ["SIZE=10", "BODY=7BIT"],
    )
    with pytest.raises(AddressError, match="null path"):
        parse_command_arg("<> SIZE=10", allow_null=False, smtputf8=False)


def test_command_arg_bare_postmaster() -> None:
    address, params = parse_command_arg(
        "<postmaster> NOTIFY=NEVER", allow_null=False, smtputf8=False, allow_bare_postmaster=True
    )
    assert address == Address("Postmaster", "")
    assert params == ["NOTIFY=NEVER"]


def test_command_arg_smtputf8() -> None:
    address, params = parse_command_arg("<jö@bücher.example> SMTPUTF8", **RCPT8)
    assert address is not None and address.needs_smtputf8
    assert params == ["SMTPUTF8"]
    with pytest.raises(SMTPUTF8Required):
        parse_command_arg("<jö@bücher.example> SMTPUTF8", **RCPT)
    assert parse_command_arg("<a@example.com> X=ü", **RCPT8)[1] == ["X=ü"]
    with pytest.raises(SMTPUTF8Required):
        parse_command_arg("<a@example.com> X=ü", **RCPT)


def test_split_command_arg() -> None:
    """For MAIL: look at the parameters (SMTPUTF8?) before parsing the path."""
    assert split_command_arg('<"x y"@ü.example> SMTPUTF8', smtputf8=True) == (
        '<"x y"@ü.example>',
        ["SMTPUTF8"],
    )
    assert split_command_arg("<> SIZE=1", smtputf8=False) == ("<>", ["SIZE=1"])


@pytest.mark.parametrize(
    ("arg", "reason"),
    [
        ("", "empty path"),
        (" ", "empty path"),
        (" <a@example.com>", "malformed path"),  # the caller strips the one space
        ("<a@example.com", "malformed path"),
        ('<"a@example.com> SIZE=1', "malformed path"),
        ("<a@example.com>SIZE=1", "text after path"),
        ("<a@example.com>>", "text after path"),
        ("<a@example.com> <b@example.com>", "malformed ESMTP parameter"),
        ("<a@example.com> =1", "malformed ESMTP parameter"),
        ("<a@example.com> -X=1", "malformed ESMTP parameter"),
        ("<a@example.com> SIZE=", "malformed ESMTP parameter"),
        ("<a@example.com> X=a=b", "malformed ESMTP parameter"),
        ("<a@example.com> SI_ZE=1", "malformed ESMTP parameter"),
        ("<a@example.com> SIZE=1\r\n", "control character"),
        ("<a@example.com> SIZE=1\tBODY=7BIT", "control character"),
        ("<a@b@example.com> SIZE=1", "more than one '@'"),
        ("<a b@example.com> SIZE=1", "invalid character in local part"),
    ],
)
def test_command_arg_invalid(arg: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_command_arg(arg, allow_null=True, smtputf8=False)
    assert reason in info.value.reason


# ---------------------------------------------------------------------------------------
# Properties

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=12)
dot_atoms = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
ldh_labels = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?", fullmatch=True)
ascii_domains = st.lists(ldh_labels, min_size=1, max_size=5).map(".".join)
unicode_labels = st.text(
    alphabet=st.sampled_from("abcxyz019-äöüßéñçøåæ日本語中文русскийΣσς"), min_size=1, max_size=12
)
unicode_domains = st.lists(unicode_labels, min_size=1, max_size=3).map(".".join)
literals = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
)
any_local = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    min_size=1,
    max_size=20,
)
NASTY = [*'<>@"\\.:,[]%!+ -aZ09é\u00a0\u3002ß', "\r\n", "IPv6:", "::1", "xn--", "@a.b:"]
NASTY += ["user", "@example.com", "Postmaster", "@[192.0.2.1]", "ü.example", '"q"']
nasty_text = st.lists(st.sampled_from(NASTY), max_size=30).map("".join)
flags = st.fixed_dictionaries(
    {
        "allow_null": st.booleans(),
        "smtputf8": st.booleans(),
        "separators": st.sampled_from(["+", "-", "+-", "", "."]),
        "allow_bare_postmaster": st.booleans(),
    }
)


def quote(local: str) -> str:
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def check_invariants(address: Address, options: dict[str, Any]) -> None:
    """Properties (3) and (4) for any address the parser returned."""
    # (3) the lookup domain is only ever letters, digits, hyphens and dots (or a literal)
    lookup_domain = address.lookup_domain
    for bad in "@%!":
        assert bad not in lookup_domain
    assert not any(c.isspace() for c in lookup_domain)
    assert lookup_domain == lookup_domain.lower()
    assert lookup_domain.isascii()
    # (4) the canonical text parses back to an equal address, with the same lookups
    again = parse_path(
        address.text,
        allow_null=False,
        smtputf8=options["smtputf8"],
        separators=address.separators,
        allow_bare_postmaster=True,
    )
    assert again == address
    assert again is not None
    assert again.text == address.text
    assert again.lookup_key == address.lookup_key
    assert again.detail == address.detail


@given(local=dot_atoms, domain=ascii_domains)
def test_property_dot_atom_round_trip(local: str, domain: str) -> None:
    """(1) any valid dot-atom local part and domain parse back to themselves."""
    path = f"<{local}@{domain}>"
    if len(path) > 256:
        return
    address = parse_path(path, allow_null=False, smtputf8=False)
    assert address is not None
    assert (address.local, address.domain, address.quoted) == (local, domain, False)
    assert address.text == f"{local}@{domain}"
    assert parse_path(address.text, allow_null=False, smtputf8=False) == address
    assert address.lookup_domain == domain.lower()


@given(arg=st.one_of(st.text(), nasty_text), options=flags)
def test_property_only_address_error(arg: str, options: dict[str, Any]) -> None:
    """(2) arbitrary input gives an Address (or None) or AddressError, nothing else."""
    for attempt in (arg, f"<{arg}>", f"<{arg}> SIZE=1"):
        try:
            address = parse_path(attempt, **options)
        except AddressError:
            pass
        else:
            assert address is None or isinstance(address, Address)
            if address is not None:
                check_invariants(address, options)
        try:
            address, params = parse_command_arg(attempt, **options)
        except AddressError:
            pass
        else:
            assert all(isinstance(p, str) and p and " " not in p for p in params)
            if address is not None:
                check_invariants(address, options)


@given(
    local=st.one_of(dot_atoms, any_local),
    domain=st.one_of(ascii_domains, unicode_domains, literals),
    route=st.lists(ascii_domains, max_size=2),
    options=flags,
)
def test_property_structured(
    local: str, domain: str, route: list[str], options: dict[str, Any]
) -> None:
    """(3) and (4) on inputs that are mostly valid, quoted, Unicode or literal."""
    options = {**options, "smtputf8": True}
    prefix = ",".join(f"@{hop}" for hop in route) + ":" if route else ""
    for wire_local in (local, quote(local)):
        try:
            address = parse_path(f"<{prefix}{wire_local}@{domain}>", **options)
        except AddressError:
            continue
        assert address is not None
        assert address.local == local
        assert address.domain == domain
        assert address.quoted is wire_local.startswith('"')
        check_invariants(address, options)
