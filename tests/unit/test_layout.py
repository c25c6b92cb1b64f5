"""The import rules of docs/architecture.md, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_only_smtp_handler_imports_aiosmtpd() -> None:
    users = [p.relative_to(REPO).as_posix() for pkg in ("gateway", "lmtp", "filters",
                                                        "tenant_api_client")
             for p in modules(pkg) if "aiosmtpd" in imports(p)]
    assert users == ["gateway/smtp_handler.py"]


def test_only_outbound_imports_aiosmtplib() -> None:
    users = [p.relative_to(REPO).as_posix() for pkg in ("gateway", "lmtp", "filters",
                                                        "tenant_api_client")
             for p in modules(pkg) if "aiosmtplib" in imports(p)]
    assert users == ["gateway/outbound.py"]


def test_filters_and_lmtp_stay_independent() -> None:
    for path in modules("filters"):
        assert "gateway" not in imports(path), path
    for path in modules("lmtp"):
        assert not imports(path) & {"gateway", "filters", "tenant_api_client"}, path
    for path in modules("tenant_api_client"):
        assert not imports(path) & {"gateway", "filters", "lmtp"}, path


def test_every_module_has_a_docstring() -> None:
    for pkg in ("gateway", "lmtp", "filters", "tenant_api_client"):
        for path in modules(pkg):
            tree = ast.parse(path.read_text())
            assert ast.get_docstring(tree), f"{path} has no module docstring"
