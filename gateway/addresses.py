"""SMTP envelope paths: parse what a client sends after ``MAIL FROM:`` / ``RCPT TO:``.

This module is the one place that turns the text of an SMTP command argument into an
:class:`Address`, and the one place that says how an address is normalised for lookups
(DESIGN.md, "Normalised lookups"). It is pure: no I/O, no DNS, no config. It runs once per
MAIL and once per RCPT, so it uses precompiled regular expressions and never the
``email`` package.

Grammar (RFC 5321 §4.1.2, extended by RFC 6531 §3.3 when SMTPUTF8 is in effect)::

    Path          = "<" [ A-d-l ":" ] Mailbox ">"
    A-d-l         = At-domain *( "," At-domain )        ; source route, §4.1.1.3 / App. C
    Mailbox       = Local-part "@" ( Domain / address-literal )
    Local-part    = Dot-string / Quoted-string
    Dot-string    = Atom *( "." Atom )                   ; Atom = 1*atext (RFC 5322 §3.2.3)
    Quoted-string = DQUOTE *( qtextSMTP / quoted-pairSMTP ) DQUOTE
    Domain        = sub-domain *( "." sub-domain )       ; letters, digits, inner hyphens
    address-literal = "[" ( IPv4 / "IPv6:" IPv6 ) "]"    ; §4.1.3
    Mail-parameters = esmtp-param *( SP esmtp-param )    ; esmtp-keyword [ "=" esmtp-value ]

RFC 6531 §3.3 adds UTF8-non-ascii to atext, qtextSMTP, sub-domain (as U-labels) and
esmtp-value. Without SMTPUTF8 any non-ASCII character is refused with
:class:`SMTPUTF8Required`, so a session can answer 553 5.6.7 (RFC 6531 §3.5) rather than a
plain syntax error.

Decisions beyond the grammar:

- A bare ``user@domain`` without angle brackets is accepted (many clients send it, Postfix
  accepts it in its lenient mode). Nothing else is: a source route or ``<>`` must be in
  brackets, and a bracketed path must be the whole path.
- A source route is accepted and ignored (RFC 5321 §4.1.1.3, §3.6.1 and Appendix C); its
  domains must still be syntactically valid.
- An unquoted local part never contains ``@``; ``<a@b@c>`` is an error. The domain we
  deliver to is always what follows the ``@`` that ends the local part: ``%`` (the %-hack)
  and ``!`` (bang paths) are ordinary atext and never select a destination.
- Control characters (C0, DEL, C1), U+2028/U+2029 and lone surrogates are refused anywhere
  in the argument, quoted or not, so no address can break a log line or a queue file.
- Non-ASCII whitespace is not atext: it is allowed inside a quoted local part only.
- An empty local part (``""@example.com``) is refused: no mailbox can be named that.
- Length limits (RFC 5321 §4.5.3.1): local part ≤ 64 octets of UTF-8, measured on the
  canonical form :attr:`Address.text` uses (so superfluous quoting does not count); domain
  ≤ 255 octets; whole path ≤ 256 octets including the angle brackets and any source route.
- Address literals must be ``[IPv4]`` or ``[IPv6:...]`` (validated with :mod:`ipaddress`,
  no zone ids, no leading zeros in IPv4); general literals (``[tag:...]``) are refused.
- ``<Postmaster>`` without a domain (RFC 5321 §4.1.1.3, §4.5.1: it MUST be accepted at
  RCPT) is returned as ``Address(local='Postmaster', domain='')`` when the caller asks for
  it with ``allow_bare_postmaster=True``. It is the only domain-less address.

Normalisation for lookups:

- ``lookup_local``: the local part (unquoted content) is split at the first character that
  is in ``separators`` (default ``+``), unless that character is the first of the local part
  (then it is not split at all, as Postfix does); the part before it is NFC-normalised and
  ``str.casefold()``-ed. ``detail`` is the part after the separator, as received.
- ``lookup_domain``: ASCII domains are lowercased. U-labels are NFC-normalised, lowercased
  and converted with Python's ``encodings.idna`` codec. That codec implements IDNA 2003
  (nameprep), not IDNA 2008/UTS 46: for instance ``straße`` becomes ``strasse`` where IDNA
  2008 would give ``xn--strae-oqa``, and a few characters IDNA 2008 forbids are mapped
  rather than refused. The result is checked again as a letters-digits-hyphens label, so a
  lookup domain never contains anything else. A domain that cannot be converted is a parse
  error. Address literals are canonicalised (``[192.0.2.1]``, ``[ipv6:2001:db8::1]``).

Equality: two addresses are equal when local part, domain and separators are equal; whether
the local part was quoted on the wire is kept (``quoted``) but not compared, since
``"john"@example.com`` and ``john@example.com`` are the same mailbox (RFC 5322 §3.4.1).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

__all__ = [
    "Address",
    "AddressError",
    "SMTPUTF8Required",
    "parse_command_arg",
    "parse_path",
    "split_command_arg",
]

MAX_LOCAL_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH_OCTETS = 256  # RFC 5321 §4.5.3.1.3, including "<", ">" and separators
MAX_LABEL_OCTETS = 63  # RFC 1035 §2.3.4


class AddressError(ValueError):
    """Syntax error; .reason is a short operator-facing text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SMTPUTF8Required(AddressError):
    """Non-ASCII text where SMTPUTF8 is not in effect (RFC 6531 §3.5: 553 5.6.7)."""


# Refused anywhere: C0 controls, DEL, C1 controls (all of Unicode category Cc), the line
# and paragraph separators (Zl, Zp) and lone surrogates (Cs, not encodable as UTF-8).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

# atext, RFC 5322 §3.2.3, plus UTF8-non-ascii (RFC 6531 §3.3) other than whitespace.
# Non-ASCII is only reachable when SMTPUTF8 is in effect (checked before any of these run).
_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|[^\x00-\x7f\s])"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")

# Quoted-string, RFC 5321 §4.1.2: qtextSMTP is %d32-33 / %d35-91 / %d93-126 (+ non-ASCII),
# quoted-pairSMTP is a backslash and one printable ASCII character (%d32-126).
_QUOTED = re.compile(r'"((?:[ !#-\[\]-~]|[^\x00-\x7f]|\\[ -~])*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")
# What needs escaping when we quote a local part again.
_NEEDS_ESCAPE = re.compile(r'(["\\])')

# Domain, RFC 5321 §4.1.2 (sub-domain = Let-dig [Ldh-str]), at most 63 octets per label.
_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ASCII_DOMAIN = re.compile(rf"{_LDH_LABEL}(?:\.{_LDH_LABEL})*")
_LOOKUP_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DOMAIN_CHAR = re.compile(r"[A-Za-z0-9.-]")

# Address literals, RFC 5321 §4.1.3. Character classes first, then ipaddress decides.
_IPV4_LITERAL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_LITERAL = re.compile(r"[0-9A-Fa-f:.]{2,45}")

# Splitting a command argument into path and parameters. A quoted string may contain
# "<", ">" and spaces, so it is consumed as a unit. Alternatives never start with the same
# character, which keeps matching linear.
_QS = r'"(?:[^"\\]|\\.)*"'
_BRACKETED_PATH = re.compile(rf'<(?:[^<>"]|{_QS})*>', re.DOTALL)
_BARE_PATH = re.compile(rf'(?:[^<>" ]|{_QS})+', re.DOTALL)

# esmtp-param, RFC 5321 §4.1.2; esmtp-value is %d33-60 / %d62-126 (+ non-ASCII, RFC 6531).
_ESMTP_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=(?:[!-<>-~]|[^\x00-\x7f])+)?")


def _octets(text: str) -> int:
    """UTF-8 length; callers have already refused lone surrogates."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _check_characters(text: str, *, smtputf8: bool) -> None:
    if _FORBIDDEN.search(text):
        raise AddressError("control character in address")
    if not smtputf8 and not text.isascii():
        raise SMTPUTF8Required("non-ASCII address without SMTPUTF8")


def _quote_local(local: str) -> str:
    """The local part as it must appear in a path: a dot-atom as is, else a quoted string."""
    if _DOT_ATOM.fullmatch(local):
        return local
    return '"' + _NEEDS_ESCAPE.sub(r"\\\1", local) + '"'


def _domain_reason(domain: str) -> str:
    """Why a non-literal domain is not a valid RFC 5321 Domain (only called on failure)."""
    if domain.endswith("."):
        return "trailing dot in domain"
    labels = domain.split(".")
    if any(not label for label in labels):
        return "empty label in domain"
    if any(_octets(label) > MAX_LABEL_OCTETS for label in labels):
        return "domain label longer than 63 octets"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return "domain label starts or ends with '-'"
    return "invalid character in domain"


def _literal_lookup(domain: str) -> str:
    """Canonical, lowercase form of an address literal, or AddressError (RFC 5321 §4.1.3)."""
    if not domain.endswith("]"):
        raise AddressError("unterminated address literal")
    body = domain[1:-1]
    if body[:5].lower() == "ipv6:":
        text = body[5:]
        if _IPV6_LITERAL.fullmatch(text):
            try:
                return f"[ipv6:{ipaddress.IPv6Address(text).compressed}]"
            except ValueError:
                pass
        raise AddressError("invalid IPv6 address literal")
    if _IPV4_LITERAL.fullmatch(body):
        try:
            return f"[{ipaddress.IPv4Address(body)}]"
        except ValueError:
            pass
        raise AddressError("invalid IPv4 address literal")
    raise AddressError("unsupported address literal")


def _u_label_lookup(label: str) -> str:
    """A-label for one non-ASCII label (IDNA 2003 via the stdlib codec), or AddressError."""
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("domain label starts or ends with '-'")
    try:
        a_label = unicodedata.normalize("NFC", label).lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError("domain cannot be converted to an A-label") from None
    a_label = a_label.lower()
    # The codec does not apply the STD3 rules and may map characters to ASCII, dots
    # included: insist on a plain letters-digits-hyphens label.
    if not _LOOKUP_LABEL.fullmatch(a_label):
        raise AddressError("domain cannot be converted to an A-label")
    return a_label


def _domain_lookup(domain: str, *, literal_ok: bool = True) -> str:
    """Validate a domain and return its lookup form (lowercase A-labels or canonical literal)."""
    if not domain:
        raise AddressError("missing domain")
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain longer than 255 octets")
    if domain.startswith("["):
        if not literal_ok:
            raise AddressError("address literal in source route")
        return _literal_lookup(domain)
    if domain.isascii():
        if not _ASCII_DOMAIN.fullmatch(domain):
            raise AddressError(_domain_reason(domain))
        return domain.lower()
    # RFC 6531 §3.3: sub-domain =/ U-label. Validate the ASCII labels as usual and convert
    # the others one by one.
    labels: list[str] = []
    for label in domain.split("."):
        if label.isascii():
            if not _ASCII_DOMAIN.fullmatch(label):
                raise AddressError(_domain_reason(domain))
            labels.append(label.lower())
        else:
            labels.append(_u_label_lookup(label))
    lookup = ".".join(labels)
    if len(lookup) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain longer than 255 octets")
    return lookup


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox from an envelope path, with its normalised lookup forms.

    Construct with :func:`parse_path` / :func:`parse_command_arg`. Direct construction
    checks the domain (it must be convertible to a lookup form), the control characters and
    the local part's length; it trusts the caller about SMTPUTF8.
    """

    local: str  # local part as received, unquoted form ('John.Doe+tag', or 'a b' for "a b")
    domain: str  # domain as received (may be U-labels, or an address literal '[192.0.2.1]')
    quoted: bool = field(default=False, compare=False)  # local part was a quoted-string
    separators: str = "+"  # subaddress separators this address was parsed with
    _text: str = field(init=False, repr=False, compare=False)
    _lookup_local: str = field(init=False, repr=False, compare=False)
    _lookup_domain: str = field(init=False, repr=False, compare=False)
    _detail: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        local, domain = self.local, self.domain
        if not local:
            raise AddressError("empty local part")
        if _FORBIDDEN.search(local) or _FORBIDDEN.search(domain):
            raise AddressError("control character in address")
        local_text = _quote_local(local)
        if _octets(local_text) > MAX_LOCAL_OCTETS:
            raise AddressError("local part longer than 64 octets")
        if domain:
            lookup_domain = _domain_lookup(domain)
            text = f"{local_text}@{domain}"
        elif local.casefold() == "postmaster":  # RFC 5321 §4.1.1.3: <Postmaster>
            lookup_domain = ""
            text = local_text
        else:
            raise AddressError("missing domain")

        base, detail = local, None
        cut = _first_separator(local, self.separators)
        if cut > 0:  # a local part that starts with a separator is not split (as Postfix)
            base, detail = local[:cut], local[cut + 1 :]
        if not base.isascii():
            base = unicodedata.normalize("NFC", base)

        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_lookup_local", base.casefold())
        object.__setattr__(self, "_lookup_domain", lookup_domain)
        object.__setattr__(self, "_detail", detail)

    @property
    def text(self) -> str:
        """Canonical 'local@domain' for logs and the queue; quotes the local part if needed."""
        return self._text

    @property
    def lookup_domain(self) -> str:
        """Lowercase A-label domain (IDNA 2003, see module doc) or canonical address literal."""
        return self._lookup_domain

    @property
    def lookup_local(self) -> str:
        """NFC-normalised, case-folded local part without its subaddress."""
        return self._lookup_local

    @property
    def detail(self) -> str | None:
        """The subaddress after the first separator, as received; None if there is none."""
        return self._detail

    @property
    def lookup_key(self) -> str:
        """'lookup_local@lookup_domain': the key for every directory lookup."""
        return f"{self._lookup_local}@{self._lookup_domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """True if the address can only be transmitted with SMTPUTF8 (RFC 6531)."""
        return not (self.local.isascii() and self.domain.isascii())


def _first_separator(local: str, separators: str) -> int:
    if len(separators) == 1:
        return local.find(separators)
    positions = [i for i in map(local.find, separators) if i >= 0]
    return min(positions) if positions else -1


def _parse_mailbox(text: str, *, separators: str, allow_bare_postmaster: bool) -> Address:
    """Mailbox = Local-part "@" ( Domain / address-literal ), RFC 5321 §4.1.2."""
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if m is None:
            raise AddressError("malformed quoted local part")
        content = m.group(1)
        local = _QUOTED_PAIR.sub(r"\1", content) if "\\" in content else content
        rest = text[m.end() :]
        if not rest:
            raise AddressError("missing domain")
        if rest[0] != "@":
            raise AddressError("text after quoted local part")
        domain, quoted = rest[1:], True
    else:
        at = text.find("@")
        if at < 0:
            if allow_bare_postmaster and text.casefold() == "postmaster":
                return Address("Postmaster", "", False, separators)
            raise AddressError("missing domain")
        local, domain, quoted = text[:at], text[at + 1 :], False
        if not local:
            raise AddressError("empty local part")
        if not _DOT_ATOM.fullmatch(local):
            if local.startswith(".") or local.endswith(".") or ".." in local:
                raise AddressError("misplaced dot in local part")
            raise AddressError("invalid character in local part")
    if "@" in domain:
        raise AddressError("more than one '@' (an '@' in a local part must be quoted)")
    if not domain:
        raise AddressError("missing domain")
    return Address(local, domain, quoted, separators)


def _parse_path(
    arg: str,
    *,
    allow_null: bool,
    separators: str,
    allow_bare_postmaster: bool,
) -> Address | None:
    if arg.startswith("<"):
        if not arg.endswith(">") or len(arg) < 2:
            raise AddressError("unterminated path")
        inner = arg[1:-1]
        if not inner:
            if allow_null:
                return None
            raise AddressError("null path not allowed here")
        path_octets = _octets(arg)
    else:
        if not arg:
            raise AddressError("empty path")
        if arg.startswith("@"):
            raise AddressError("source route without angle brackets")
        inner = arg
        path_octets = _octets(arg) + 2
    if path_octets > MAX_PATH_OCTETS:
        raise AddressError("path longer than 256 octets")

    if inner.startswith("@"):
        # Source route (RFC 5321 §4.1.1.3, Appendix C): accept, validate, ignore.
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("malformed source route")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route")
            _domain_lookup(hop[1:], literal_ok=False)
        inner = inner[colon + 1 :]
    return _parse_mailbox(inner, separators=separators, allow_bare_postmaster=allow_bare_postmaster)


def parse_path(
    arg: str,
    *,
    allow_null: bool,
    smtputf8: bool,
    separators: str = "+",
    allow_bare_postmaster: bool = False,
) -> Address | None:
    """Parse a path alone: ``<user@example.com>``, ``<>``, or a bare ``user@example.com``.

    Returns None for the null path ``<>`` when ``allow_null`` (reverse-path, RFC 5321
    §4.1.1.2), else raises :class:`AddressError`. ``smtputf8`` allows non-ASCII (RFC 6531);
    without it non-ASCII raises :class:`SMTPUTF8Required`. ``separators`` are the
    subaddress separators used for :attr:`Address.lookup_local`. ``allow_bare_postmaster``
    accepts ``<Postmaster>`` without a domain (for RCPT, RFC 5321 §4.1.1.3).
    """
    _check_characters(arg, smtputf8=smtputf8)
    return _parse_path(
        arg,
        allow_null=allow_null,
        separators=separators,
        allow_bare_postmaster=allow_bare_postmaster,
    )


def split_command_arg(arg: str, *, smtputf8: bool) -> tuple[str, list[str]]:
    """Split ``<path> SP param *(SP param)`` into the path text and the raw parameters.

    Parameters are checked against the esmtp-param grammar (RFC 5321 §4.1.2) and returned
    as received, e.g. ``["SIZE=123", "BODY=8BITMIME"]``. Runs of spaces between parameters
    and trailing spaces are tolerated. The path itself is not checked here.
    """
    _check_characters(arg, smtputf8=smtputf8)
    return _split(arg)


def _split(arg: str) -> tuple[str, list[str]]:
    m = (_BRACKETED_PATH if arg.startswith("<") else _BARE_PATH).match(arg)
    if m is None:
        raise AddressError("malformed path" if arg.strip() else "empty path")
    path, rest = m.group(0), arg[m.end() :]
    if rest and rest[0] != " ":
        raise AddressError("text after path")
    params = [p for p in rest.split(" ") if p]
    for param in params:
        if not _ESMTP_PARAM.fullmatch(param):
            raise AddressError("malformed ESMTP parameter")
    return path, params


def parse_command_arg(
    arg: str,
    *,
    allow_null: bool,
    smtputf8: bool,
    separators: str = "+",
    allow_bare_postmaster: bool = False,
) -> tuple[Address | None, list[str]]:
    """Parse everything after ``MAIL FROM:`` / ``RCPT TO:``: the path and ESMTP parameters.

    The caller strips the command and the one space some clients put after the colon. For
    MAIL, pass ``smtputf8=True`` when the server advertises SMTPUTF8 and then refuse an
    address with :attr:`Address.needs_smtputf8` unless the SMTPUTF8 parameter is present
    (or call :func:`split_command_arg` first and decide before :func:`parse_path`).
    """
    # Senders and recipients recur (the same mailboxes, message after message), and
    # the result is immutable apart from the parameter list, which is copied.
    address, params = _parsed_command_arg(arg, allow_null, smtputf8, separators,
                                          allow_bare_postmaster)
    return address, list(params)


@functools.lru_cache(maxsize=8192)
def _parsed_command_arg(arg: str, allow_null: bool, smtputf8: bool, separators: str,
                        allow_bare_postmaster: bool) -> tuple[Address | None, tuple[str, ...]]:
    _check_characters(arg, smtputf8=smtputf8)
    path, params = _split(arg)
    address = _parse_path(
        path,
        allow_null=allow_null,
        separators=separators,
        allow_bare_postmaster=allow_bare_postmaster,
    )
    return address, tuple(params)
