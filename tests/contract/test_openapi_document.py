"""The tenant API contract (docs/tenant-api.yaml) against the structs the gateway decodes.

The JSON the tenant API speaks is exactly the msgspec structs of
`tenant_api_client/models.py`. These tests keep the document and the code in step:

* the document is valid OpenAPI 3.1 and every `$ref` resolves;
* every struct is a schema of the same name with the same properties, required set,
  types (nullability and enums included) and defaults, compared with what
  `msgspec.json.schema_components` derives from the struct: a field added to a model
  and not to the document fails here;
* every operation the gateway relies on is documented with its status codes, bodies,
  bearer auth and caching headers;
* every example in the document decodes strictly into its struct (as the gateway would
  decode it) and validates against the documented schema.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from tenant_api_client import models

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "tenant-api.yaml"
GUIDE = ROOT / "docs" / "tenant-api.md"
REF_PREFIX = "#/components/schemas/"

# Every struct defined in models.py is part of the wire format (aliases such as
# TenantPolicy = Policy count once, under the class's own name).
MODELS: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls
    for cls in vars(models).values()
    if inspect.isclass(cls) and issubclass(cls, msgspec.Struct)
    and cls.__module__ == models.__name__
}
# Bodies only the API side has (the gateway reads just the status code).
API_ONLY_SCHEMAS = {"EventAccepted"}

# (method, path) → {status: schema name of the JSON body, or None for no body}.
OPERATIONS: dict[tuple[str, str], dict[str, str | None]] = {
    ("get", "/v1/health"): {"200": "Health"},
    ("get", "/v1/recipients/{address}"): {
        "200": "Recipient", "304": None, "400": "ApiError", "401": "ApiError",
        "404": "Unknown"},
    ("get", "/v1/tenants/{tenant_id}"): {
        "200": "Tenant", "304": None, "401": "ApiError", "404": "ApiError"},
    ("get", "/v1/tenants/{tenant_id}/limits"): {
        "200": "Limits", "304": None, "401": "ApiError", "404": "ApiError"},
    ("get", "/v1/domains/{domain}"): {
        "200": "DomainInfo", "304": None, "400": "ApiError", "401": "ApiError", "404": "ApiError"},
    ("get", "/v1/domains/{domain}/dkim"): {
        "200": "DkimKeys", "304": None, "400": "ApiError", "401": "ApiError", "404": "ApiError"},
    ("post", "/v1/auth"): {"200": "Account", "400": "ApiError", "401": "ApiError"},
    ("get", "/v1/accounts/{username}/senders/{sender}"): {
        "200": "SenderPermission", "304": None, "401": "ApiError", "404": "ApiError"},
    ("get", "/v1/accounts/{username}/limits"): {
        "200": "Limits", "304": None, "401": "ApiError", "404": "ApiError"},
    ("post", "/v1/events"): {"202": "EventAccepted", "400": "ApiError", "401": "ApiError"},
}
REQUEST_BODIES = {("post", "/v1/auth"): "AuthRequest", ("post", "/v1/events"): "Event"}
UNAUTHENTICATED = {("get", "/v1/health")}
# GETs whose answers the gateway caches: ETag, Cache-Control, If-None-Match → 304.
CACHEABLE = {op for op in OPERATIONS if op[0] == "get"} - UNAUTHENTICATED
NO_STORE = {("post", "/v1/auth")}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def expected_schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        list(MODELS.values()), ref_template=REF_PREFIX + "{name}")
    return components


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local `$ref`s (only the keys of the referenced object count)."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"non-local $ref {ref}"
        assert ref not in seen, f"$ref cycle at {ref}"
        seen.add(ref)
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op
            for path, item in doc["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS}


def body_schema_name(doc: dict[str, Any], holder: dict[str, Any]) -> str | None:
    """The component name of a request body's / response's JSON schema (None: no body)."""
    content = resolve(doc, holder).get("content")
    if not content:
        return None
    assert set(content) == {"application/json"}, f"unexpected media types {set(content)}"
    ref = content["application/json"]["schema"].get("$ref", "")
    assert ref.startswith(REF_PREFIX), f"body schema should be a component $ref, not {ref!r}"
    return str(ref.removeprefix(REF_PREFIX))


def header_names(doc: dict[str, Any], response: dict[str, Any]) -> set[str]:
    return {name.lower() for name in resolve(doc, response).get("headers", {})}


def type_signature(schema: dict[str, Any]) -> frozenset[Any]:
    """What values a schema admits, as a comparable set of atoms.

    Spelling differences vanish: `type: [string, "null"]` equals `anyOf: [string, null]`,
    enum order does not matter, and annotations (title, description, examples, format,
    bounds) are ignored.
    """
    if "$ref" in schema:
        return frozenset({("ref", schema["$ref"].rsplit("/", 1)[-1])})
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return frozenset().union(*(type_signature(s) for s in schema[combinator]))
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        atoms: set[Any] = {("enum", frozenset(v for v in values if v is not None))}
        if None in values:
            atoms.add("null")
        return frozenset(atoms)
    types = schema.get("type", [])
    atoms = set()
    for t in [types] if isinstance(types, str) else types:
        if t == "array":
            atoms.add(("array", type_signature(schema.get("items", {}))))
        elif t == "object" and isinstance(schema.get("additionalProperties"), dict):
            atoms.add(("map", type_signature(schema["additionalProperties"])))
        else:
            atoms.add(t)
    return frozenset(atoms)


def same_default(model: type[msgspec.Struct], prop: str, documented: Any) -> bool:
    """Does the documented default decode to the struct field's default?"""
    field = next(f for f in msgspec.structs.fields(model) if f.encode_name == prop)
    default = (field.default if field.default is not msgspec.NODEFAULT
               else field.default_factory())
    try:
        decoded = msgspec.json.decode(json.dumps(documented).encode(), type=field.type)
    except msgspec.ValidationError:
        return False
    return bool(decoded == default and type(decoded) is type(default))


def schema_problems(name: str, documented: dict[str, Any], expected: dict[str, Any],
                    model: type[msgspec.Struct]) -> list[str]:
    """Every way the documented schema differs from the one derived from the struct."""
    problems = []
    if documented.get("type") != "object":
        problems.append(f"{name}: type should be object")
    if documented.get("additionalProperties") is False:
        problems.append(f"{name}: must stay open (the gateway ignores unknown properties)")
    doc_props: dict[str, Any] = documented.get("properties", {})
    exp_props: dict[str, Any] = expected["properties"]
    for prop in sorted(exp_props.keys() - doc_props.keys()):
        problems.append(f"{name}.{prop}: in the model, not documented")
    for prop in sorted(doc_props.keys() - exp_props.keys()):
        problems.append(f"{name}.{prop}: documented, not in the model")
    doc_required = set(documented.get("required", []))
    exp_required = set(expected.get("required", []))
    if doc_required != exp_required:
        problems.append(f"{name}: required {sorted(doc_required)}, the model requires "
                        f"{sorted(exp_required)}")
    for prop in sorted(exp_props.keys() & doc_props.keys()):
        got, want = doc_props[prop], exp_props[prop]
        if type_signature(got) != type_signature(want):
            problems.append(f"{name}.{prop}: type {sorted(map(str, type_signature(got)))}, "
                            f"the model says {sorted(map(str, type_signature(want)))}")
        if ("default" in got) != ("default" in want):
            problems.append(f"{name}.{prop}: default "
                            f"{'documented' if 'default' in got else 'missing'}, the model "
                            f"{'has one' if 'default' in want else 'has none'}")
        elif "default" in got and not same_default(model, prop, got["default"]):
            problems.append(f"{name}.{prop}: default {got['default']!r}, the model's is "
                            f"{want['default']!r}")
    return problems


def examples_of(doc: dict[str, Any], holder: dict[str, Any]) -> list[tuple[str, Any]]:
    media = resolve(doc, holder)["content"]["application/json"]
    found = [(key, resolve(doc, ex)["value"]) for key, ex in media.get("examples", {}).items()]
    if "example" in media:
        found.append(("example", media["example"]))
    return found


def all_examples(doc: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(where, schema name, value) for every request and response body example."""
    found = []
    for (method, path), op in operations(doc).items():
        holders = [("request", op["requestBody"])] if "requestBody" in op else []
        holders += list(op["responses"].items())
        for status, holder in holders:
            name = body_schema_name(doc, holder)
            if name is None:
                continue
            for key, value in examples_of(doc, holder):
                found.append((f"{method.upper()} {path} {status} {key}", name, value))
    return found


def undeclared_keys(example: Any, decoded: Any, where: str = "") -> list[str]:
    """Keys of an example that the struct does not have (msgspec would ignore them)."""
    if isinstance(example, dict) and isinstance(decoded, dict):
        out = [f"{where}.{k}" for k in example if k not in decoded]
        for k in example.keys() & decoded.keys():
            out += undeclared_keys(example[k], decoded[k], f"{where}.{k}")
        return out
    if isinstance(example, list) and isinstance(decoded, list):
        return [p for i, (e, d) in enumerate(zip(example, decoded, strict=False))
                for p in undeclared_keys(e, d, f"{where}[{i}]")]
    return []


# --------------------------------------------------------------------------- the document

def test_document_is_openapi_3_1(doc: dict[str, Any]) -> None:
    assert str(doc["openapi"]).startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["paths"] and doc["components"]["schemas"]
    for (method, path), op in operations(doc).items():
        assert path.startswith("/v1/"), f"{path}: paths are versioned"
        assert op.get("responses"), f"{method} {path}: no responses"
        assert op.get("operationId") and op.get("summary"), f"{method} {path}"
    try:
        from openapi_spec_validator import validate
    except ImportError:  # the structural checks above and below still run
        return
    validate(doc)


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                resolve(doc, {"$ref": node["$ref"]})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(doc)


# --------------------------------------------------------------------------- schemas vs models

def test_every_model_has_a_schema_and_nothing_else(doc: dict[str, Any]) -> None:
    documented = set(doc["components"]["schemas"])
    assert sorted(MODELS.keys() - documented) == [], "models without a schema"
    assert sorted(documented - MODELS.keys() - API_ONLY_SCHEMAS) == [], \
        "schemas without a model"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_matches_model(name: str, doc: dict[str, Any],
                              expected_schemas: dict[str, Any]) -> None:
    documented = doc["components"]["schemas"].get(name)
    assert documented is not None, f"{name} is not documented"
    assert schema_problems(name, documented, expected_schemas[name], MODELS[name]) == []


def test_comparison_notices_drift(doc: dict[str, Any],
                                  expected_schemas: dict[str, Any]) -> None:
    """The checks above would fail for a new field, a retyped field or a new default."""

    class Limits(models.Limits, frozen=True, kw_only=True):
        messages_per_day: int | None = None

    class Health(msgspec.Struct, frozen=True, kw_only=True):
        status: int = 0

    for model in (Limits, Health):
        _, derived = msgspec.json.schema_components([model])
        problems = schema_problems(model.__name__, doc["components"]["schemas"][
            model.__name__], derived[model.__name__], model)
        assert problems, f"a changed {model.__name__} went unnoticed"
    documented = json.loads(json.dumps(doc["components"]["schemas"]["Policy"]))
    documented["properties"]["spam_tag_score"]["default"] = 6.0
    documented["properties"]["srs_domain"]["type"] = "string"
    documented["required"] = ["greylisting"]
    problems = schema_problems("Policy", documented, expected_schemas["Policy"],
                               models.Policy)
    assert len(problems) == 3, problems


# --------------------------------------------------------------------------- operations

def test_every_operation_is_documented(doc: dict[str, Any]) -> None:
    assert sorted(operations(doc)) == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS))
def test_operation_status_codes_and_bodies(method: str, path: str,
                                           doc: dict[str, Any]) -> None:
    op = operations(doc)[method, path]
    responses = op["responses"]
    for status, schema in OPERATIONS[method, path].items():
        assert status in responses, f"{method} {path}: status {status} not documented"
        assert body_schema_name(doc, responses[status]) == schema, \
            f"{method} {path} {status}: body"
    for status, response in responses.items():
        if re.fullmatch(r"[45](\d\d|XX)", status):
            assert body_schema_name(doc, response) in {"ApiError", "Unknown"}, \
                f"{method} {path} {status}: errors carry an ApiError body"
    assert "5XX" in responses, f"{method} {path}: document the server-error answer"
    if (method, path) in REQUEST_BODIES:
        assert op["requestBody"].get("required") is True
        assert body_schema_name(doc, op["requestBody"]) == REQUEST_BODIES[method, path]
    else:
        assert "requestBody" not in op
    templated = set(re.findall(r"{(\w+)}", path))
    params = [resolve(doc, p) for p in op.get("parameters", [])]
    in_path = {p["name"] for p in params if p["in"] == "path"}
    assert in_path == templated


def test_bearer_auth_everywhere_but_health(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"].lower()) == ("http", "bearer")
    assert doc["security"] == [{"bearerAuth": []}]
    for key, op in operations(doc).items():
        if key in UNAUTHENTICATED:
            assert op.get("security") == [], key
            continue
        assert "security" not in op or op["security"] == doc["security"], key
        unauthorized = op["responses"]["401"]
        assert "www-authenticate" in header_names(doc, unauthorized), key


@pytest.mark.parametrize(("method", "path"), sorted(CACHEABLE))
def test_cacheable_gets_carry_validators(method: str, path: str,
                                         doc: dict[str, Any]) -> None:
    op = operations(doc)[method, path]
    params = [resolve(doc, p) for p in op.get("parameters", [])]
    assert any(p["in"] == "header" and p["name"].lower() == "if-none-match"
               for p in params), "If-None-Match request header"
    for status in ("200", "304"):
        headers = header_names(doc, op["responses"][status])
        assert {"etag", "cache-control"} <= headers, f"{status}: {headers}"
    assert "cache-control" in header_names(doc, op["responses"]["404"]), \
        "negative answers say how long they may be kept"


@pytest.mark.parametrize(("method", "path"), sorted(NO_STORE))
def test_auth_answers_are_never_stored(method: str, path: str, doc: dict[str, Any]) -> None:
    responses = operations(doc)[method, path]["responses"]
    for status in OPERATIONS[method, path]:
        headers = resolve(doc, responses[status])["headers"]
        cache_control = resolve(doc, headers["Cache-Control"])
        assert cache_control["schema"].get("const") == "no-store", status
        assert cache_control.get("required") is True


# --------------------------------------------------------------------------- examples

def test_every_operation_has_examples(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        if "requestBody" in op:
            assert examples_of(doc, op["requestBody"]), f"{method} {path} request"
        for status, response in op["responses"].items():
            if resolve(doc, response).get("content"):
                assert examples_of(doc, response), f"{method} {path} {status}"


def test_examples_decode_into_the_models(doc: dict[str, Any]) -> None:
    checked = 0
    for where, name, value in all_examples(doc):
        if name in API_ONLY_SCHEMAS:
            continue
        try:
            decoded = msgspec.json.decode(json.dumps(value).encode(), type=MODELS[name])
        except msgspec.ValidationError as exc:
            pytest.fail(f"{where}: not a valid {name}: {exc}")
        assert undeclared_keys(value, msgspec.to_builtins(decoded)) == [], where
        checked += 1
    assert checked >= len(OPERATIONS)


def test_examples_match_the_documented_schemas(doc: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for where, name, value in all_examples(doc):
        validator = jsonschema.Draft202012Validator(
            {"$ref": REF_PREFIX + name, "components": doc["components"]})
        errors = [e.message for e in validator.iter_errors(value)]
        assert errors == [], where


def test_unknown_examples_tell_hosted_from_foreign_domains(doc: dict[str, Any]) -> None:
    response = operations(doc)["get", "/v1/recipients/{address}"]["responses"]["404"]
    tenants = {value.get("tenant") for _, value in examples_of(doc, response)}
    assert None in tenants and any(isinstance(t, str) for t in tenants)


def test_guide_covers_every_path(doc: dict[str, Any]) -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    for path in doc["paths"]:
        assert f"{path}`" in guide, f"docs/tenant-api.md does not mention {path}"


def test_auth_failures_tell_wrong_credentials_from_a_refused_token(
        doc: dict[str, Any]) -> None:
    """Only `invalid_credentials` may become 535 at SMTP; a refused token is an outage."""
    response = operations(doc)["post", "/v1/auth"]["responses"]["401"]
    codes = {value["error"] for _, value in examples_of(doc, response)}
    assert "invalid_credentials" in codes and codes - {"invalid_credentials"}
