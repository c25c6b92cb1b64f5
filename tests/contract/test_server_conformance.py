"""The reference tenant API server conforms to its own OpenAPI document.

`mailedge tenant-api` runs as a real process on 127.0.0.1, serving a tenants file made
for the document's examples (acme with example.test and bücher.example, globex with
example.org, alice's login with the example password, DKIM keys, an alias, a forward,
a catch-all). Schemathesis reads docs/tenant-api.yaml and, for every operation, sends
the document's own examples, its coverage cases (boundaries, and values the schema
forbids) and fuzzed inputs (unicode and percent-encoded path segments, random JSON
bodies). Every answer must have a documented status, content type, headers and a body
that validates against the documented schema, and none may be a 5xx.

The fuzzer seldom writes an `@`, so a Hypothesis test sends address-shaped keys (known
mailboxes, case and subaddress variants, IDN and broken domains, random unicode) with `@`
both literally and as `%40`: the same documented answer either way.

Explicit cases pin what the fuzzer reaches only by chance: the bearer challenge, wrong
tokens, revalidation with `If-None-Match` (weak and listed tags too), bodies that are not
JSON or too large, unknown event types, and sender permissions agreeing with the login.

The run is bounded and deterministic: at most `MAX_EXAMPLES` fuzzed cases per operation,
derandomized, no example database.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
import schemathesis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.peers.ports import free_port, port_is_open

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "tenant-api.yaml"
TOKEN = "conformance-token"
PASSWORD = "correct horse battery staple"  # the document's AuthRequest examples use it
MAX_EXAMPLES = 30
START_TIMEOUT = 15.0

# What every answer must satisfy: a documented status (with `5XX` documented, a server
# error still fails `not_a_server_error`), content type, headers and body.
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_path(DOCUMENT)
schema.config.update(headers={"Authorization": f"Bearer {TOKEN}"}, request_timeout=10)
schema.config.generation.update(
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    database="none",
    # The bearer token is ours to send; the explicit tests below cover missing and wrong ones.
    with_security_parameters=False,
)


def tenants_file(root: Path) -> Path:
    """Data behind the document's examples, so they meet real records."""
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (root / "ed.pem").write_bytes(key)
    text = f"""
[tenant.acme]
name = "Acme Web Hosting customer"
domains = ["example.test", "bücher.example", "catch.example"]
mailboxes = ["alice@example.test", "jörg@bücher.example", "any@catch.example"]

[tenant.acme.mailbox."bob@example.test"]
[tenant.acme.mailbox."bob@example.test".autoreply]
subject = "Out of office"
body = "I am away until 14 July."
start = "2025-07-01"
end = "2025-07-14"
[tenant.acme.mailbox."carol@example.test"]
storage = "127.0.0.1:2424"
over_quota = true
[tenant.acme.mailbox."dora@example.test"]
disabled = true

[tenant.acme.alias."sales@example.test"]
targets = ["alice@example.test", "partner@elsewhere.example"]
[tenant.acme.forward."old@example.test"]
targets = ["dave.private@mail.example.net"]
keep_copy = true

[tenant.acme.policy]
virus_action = "quarantine"
antispam_fail_open = true
greylisting = true
srs_domain = "srs.example.test"
archive_retention_days = 30
max_message_size = 26214400
[tenant.acme.limits]
messages_per_hour = 5000
recipients_per_hour = 20000

[tenant.acme.domain."bücher.example"]
policy = {{ dmarc_enforcement = "monitor" }}
[tenant.acme.domain."catch.example"]
catch_all = "any@catch.example"
[tenant.acme.domain."example.test".dkim.ed2025]
algorithm = "ed25519-sha256"
private_key_file = "ed.pem"
[tenant.acme.domain."example.test".dkim.old2024]
algorithm = "ed25519-sha256"
private_key_file = "ed.pem"
active = false

[tenant.acme.account."alice@example.test"]
password = "{{PLAIN}}{PASSWORD}"
allowed_senders = ["alice@example.test", "@example.test"]
limits = {{ messages_per_hour = 500, recipients_per_hour = 2000, recipients_per_message = 100 }}
[tenant.acme.account."bob@example.test"]
password = "{{PLAIN}}{PASSWORD}"
allowed_senders = ["bob@example.test"]
contained = true

[tenant.globex]
name = "Globex"
domains = ["example.org"]
mailboxes = ["postmaster@example.org"]
[tenant.globex.forward."dave@example.org"]
targets = ["dave.private@mail.example.net"]
[tenant.globex.domain."example.org"]
catch_all = "postmaster@example.org"
"""
    path = root / "tenants.toml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass(frozen=True)
class Api:
    url: str
    process: subprocess.Popen[bytes]


def _start(data: Path, log: Path) -> Api:
    """`mailedge tenant-api` on a free loopback port (retried if the port was taken)."""
    for _ in range(3):
        port = free_port()
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "tenant-api", "--data", str(data),
                 "--listen", f"127.0.0.1:{port}", "--token", TOKEN],
                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if port_is_open("127.0.0.1", port):
                return Api(f"http://127.0.0.1:{port}", process)
            time.sleep(0.05)
        _stop(process)
        if "Address already in use" not in log.read_text(errors="replace"):
            break
    raise RuntimeError(f"mailedge tenant-api did not start:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("tenant-api")
    started = _start(tenants_file(root), root / "server.log")
    try:
        yield started
    finally:
        _stop(started.process)
    # A traceback through our code is a bug even when the client saw a clean answer.
    log = (root / "server.log").read_text(errors="replace")
    assert not re.search(r'File "[^"]*tenant_api_client/', log), log


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http


# ------------------------------------------------------------------- property tests

DOC: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
# POST /v1/events: "Event types the server does not know should be accepted and ignored so
# the gateway can add types". The schema's enum lists the types the gateway sends today; a
# body that is an Event but for its type must be accepted all the same.
_event = DOC["components"]["schemas"]["Event"]
EVENT_ANY_TYPE = jsonschema.Draft202012Validator({
    **_event,
    "properties": {**_event["properties"], "type": {"type": "string"}},
})


def events_accept_exactly_events(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """reportEvent answers 202 to every Event (whatever its type) and 400 to anything else."""
    if case.method.upper() != "POST":
        return  # an undocumented method (the coverage phase tries them all)
    media_type = (case.media_type or "application/json").split(";")[0].strip()
    valid = media_type == "application/json" and EVENT_ANY_TYPE.is_valid(case.body)
    expected = 202 if valid else 400
    assert response.status_code == expected, (
        f"POST /v1/events answered {response.status_code} to {case.body!r} "
        f"({'an Event' if valid else 'not an Event'}): expected {expected}")


def checks_for(case: schemathesis.Case) -> list[Any]:
    if case.operation.path == "/v1/events":
        return [*CONFORMANCE, events_accept_exactly_events]
    if case.operation.method.upper() == "POST":
        # A request body the document calls valid is never refused as malformed (400).
        return [*CONFORMANCE, negative_data_rejection, positive_data_acceptance]
    # Path parameters are plain strings in the document; which of them are addresses or
    # domains is in the prose, so a schema-valid "000" may rightly get a 400 here.
    return [*CONFORMANCE, negative_data_rejection]


@schema.parametrize()
def test_conforms_to_document(case: schemathesis.Case, api: Api) -> None:
    case.call_and_validate(base_url=api.url, checks=checks_for(case))


# The fuzzer rarely writes an `@`: address-shaped keys, written both ways the document
# allows (`@` literally and as `%40`), must get the same documented answer.
LOCALS = st.one_of(
    st.sampled_from(["alice", "Alice", "ALICE+news", "bob", "carol", "sales", "old", "jörg",
                     "JÖRG", "Jo\u0308rg+x", "nobody", "+", "a+b+c", "a/b", "a%40b",
                     "a@b", "postmaster", "dave", "\u0130", "ß"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
)
DOMAINS = st.one_of(
    st.sampled_from(["example.test", "Example.TEST", "example.test.", "bücher.example",
                     "BÜCHER.example", "xn--bcher-kva.example", "catch.example",
                     "example.org", "elsewhere.example", "", ".", "a..b", "ü..example",
                     "xn--", "[192.0.2.1]", "\u2603" * 70, "exa mple.test"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
)
ADDRESS_OPERATIONS = {
    "/v1/recipients/{address}": ("address",),
    "/v1/accounts/{username}/senders/{sender}": ("username", "sender"),
    "/v1/accounts/{username}/limits": ("username",),
}


def _encode(address: str, at: str) -> str:
    local, _, domain = address.rpartition("@")
    return quote(local, safe="") + at + quote(domain, safe="")


@settings(max_examples=100, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(ADDRESS_OPERATIONS)), data=st.data())
def test_address_keys_either_way(api: Api, path: str, data: st.DataObject) -> None:
    values = {name: data.draw(st.builds("{}@{}".format, LOCALS, DOMAINS), label=name)
              for name in ADDRESS_OPERATIONS[path]}
    if path.endswith("/senders/{sender}") and data.draw(st.booleans(), label="alice"):
        values["username"] = "alice@example.test"
    operation = schema[path]["GET"]
    case = operation.Case(path_parameters=values)
    answers = []
    with httpx.Client(base_url=api.url, timeout=10,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for at in ("@", "%40"):
            url = path.format(**{name: _encode(value, at) for name, value in values.items()})
            response = http.get(url)
            case.validate_response(response, checks=CONFORMANCE)
            answers.append((response.status_code, response.content))
    assert answers[0] == answers[1], f"{values}: `@` and `%40` answered differently"
    status, body = answers[0]
    if path == "/v1/recipients/{address}" and status == 200:
        found = json.loads(body)
        local, _, domain = found["address"].rpartition("@")
        # The answer is a lookup key: lowercase A-label domain, case-folded local part.
        assert domain.isascii() and domain == domain.lower(), found
        assert local == local.casefold() and "+" not in local[1:], found


# ------------------------------------------------------------------ explicit cases

def _is_api_error(response: httpx.Response, error: str) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert isinstance(body.get("detail", ""), str)
    return body


def test_no_token_is_a_bearer_challenge(api: Api) -> None:
    response = httpx.get(f"{api.url}/v1/tenants/acme", timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    _is_api_error(response, "invalid_token")


@pytest.mark.parametrize("authorization", [
    f"Bearer {TOKEN}x", "Bearer", f"Basic {TOKEN}", f"bearer  {TOKEN}", TOKEN])
def test_wrong_token_is_refused(api: Api, authorization: str) -> None:
    response = httpx.get(f"{api.url}/v1/recipients/alice@example.test",
                         headers={"Authorization": authorization}, timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    _is_api_error(response, "invalid_token")


def test_wrong_token_on_auth_is_not_invalid_credentials(api: Api) -> None:
    response = httpx.post(f"{api.url}/v1/auth", timeout=10,
                          headers={"Authorization": "Bearer nope"},
                          json={"username": "alice@example.test", "password": PASSWORD})
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers
    _is_api_error(response, "invalid_token")


def test_health_needs_no_token(api: Api) -> None:
    response = httpx.get(f"{api.url}/v1/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", [
    "/v1/recipients/alice@example.test",
    "/v1/recipients/alice%40example.test",
    "/v1/tenants/acme",
    "/v1/tenants/acme/limits",
    "/v1/domains/example.test",
    "/v1/domains/example.test/dkim",
    "/v1/accounts/alice@example.test/senders/alice@example.test",
    "/v1/accounts/alice@example.test/limits",
])
def test_if_none_match_with_the_etag_is_not_modified(client: httpx.Client, path: str) -> None:
    first = client.get(path)
    assert first.status_code == 200
    etag = first.headers["ETag"]
    again = client.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["ETag"] == etag
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"]
    stale = client.get(path, headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content == first.content


@pytest.mark.parametrize("if_none_match", [
    "W/{etag}", '"other", {etag}', '{etag},"other"', "*"])
def test_if_none_match_compares_weakly(client: httpx.Client, if_none_match: str) -> None:
    """RFC 9110 13.1.2: a proxy may have weakened the tag, or a cache sent several."""
    etag = client.get("/v1/tenants/acme").headers["ETag"]
    again = client.get("/v1/tenants/acme",
                       headers={"If-None-Match": if_none_match.format(etag=etag)})
    assert again.status_code == 304
    assert again.headers["ETag"] == etag


@pytest.mark.parametrize("path", ["/v1/auth", "/v1/events"])
@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"[]", b"null", b'{"username": 1}',
                                  b"\xff\xfe", b'{"type": "account_contained"}'])
def test_malformed_body_is_bad_request(client: httpx.Client, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    _is_api_error(response, "bad_request")
    if path == "/v1/auth":
        assert response.headers["Cache-Control"] == "no-store"


def test_unknown_event_types_are_accepted_and_ignored(client: httpx.Client) -> None:
    """The document: unknown event types are accepted and ignored, so the gateway can add types."""
    event = {"type": "quota_warning", "tenant": "acme", "at": 1.5, "details": {"used": 99}}
    response = client.post("/v1/events", json=event)
    assert response.status_code == 202
    assert response.json() == {"accepted": True}
    # Still an Event apart from its type: a wrong field is a 400 whatever the type.
    for broken in ({**event, "tenant": 7}, {**event, "details": {"used": True}},
                   {"type": "quota_warning"}, {**event, "type": 3}):
        refused = client.post("/v1/events", json=broken)
        assert refused.status_code == 400, broken
        _is_api_error(refused, "bad_request")


@pytest.mark.parametrize("path", ["/v1/auth", "/v1/events"])
def test_oversized_body_is_an_api_error(client: httpx.Client, path: str) -> None:
    """Every 4xx and 5xx answer carries an ApiError body, aiohttp's own 413 included."""
    body = b'{"username": "' + b"x" * (2 * 1024 * 1024) + b'", "password": "x"}'
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    _is_api_error(response, "bad_request")


def test_auth_with_the_examples_password(client: httpx.Client) -> None:
    ok = client.post("/v1/auth", json={"username": "alice@example.test", "password": PASSWORD,
                                       "mechanism": "PLAIN", "client_ip": "198.51.100.23"})
    assert ok.status_code == 200
    assert ok.json()["tenant"] == "acme"
    assert ok.headers["Cache-Control"] == "no-store"
    wrong = client.post("/v1/auth", json={"username": "alice@example.test", "password": "x"})
    assert wrong.status_code == 401
    assert wrong.headers["Cache-Control"] == "no-store"
    assert "WWW-Authenticate" in wrong.headers
    _is_api_error(wrong, "invalid_credentials")


def test_sender_permission_agrees_with_allowed_senders(client: httpx.Client) -> None:
    """The document: the senders endpoint is the authority and `allowed_senders` agrees."""
    account = client.post("/v1/auth", json={"username": "alice@example.test",
                                            "password": PASSWORD}).json()
    for allowed in account["allowed_senders"]:
        sender = f"anyone{allowed}" if allowed.startswith("@") else allowed
        answer = client.get(f"/v1/accounts/alice@example.test/senders/{quote(sender)}")
        assert answer.status_code == 200 and answer.json() == {"allowed": True}, sender
    refused = client.get("/v1/accounts/alice@example.test/senders/zed@example.org")
    assert refused.status_code == 200 and refused.json() == {"allowed": False}
    missing = client.get("/v1/accounts/ghost@example.test/senders/ghost@example.test")
    assert missing.status_code == 404
    _is_api_error(missing, "not_found")
