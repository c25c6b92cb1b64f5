"""The SPF council's test suites (RFC 7208, RFC 4408) as shipped in pyspf's sdist.

`suite_files()` returns the YAML files from `<repo>/var/testdata/pyspf-<version>/`; when
they are not there yet it downloads the sdist of the *installed* pyspf version with
`pip download --no-binary :all:` (PyPI is reachable from CI) and extracts only those files.
`SuiteUnavailable` says why that failed; the tests turn it into a failure under CI (env
CI set) and a skip elsewhere. `load_cases()` flattens a file into one `SuiteCase` per test.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "var" / "testdata"
SUITES = ("rfc7208-tests.yml", "rfc4408-tests.yml")


class SuiteUnavailable(Exception):
    """The suite files are not cached and could not be downloaded."""


@dataclass(frozen=True)
class SuiteCase:
    file: str  # rfc7208-tests.yml
    scenario: str  # the scenario's description
    name: str  # the test's id within the file
    spec: str
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]  # acceptable results, preferred first
    explanation: str | None
    zonedata: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.file.split('-', 1)[0]}/{self.name}"


def pyspf_version() -> str:
    return importlib.metadata.version("pyspf")


def suite_files() -> dict[str, Path]:
    """{file name: path} for SUITES, downloading them once if needed."""
    target = TESTDATA / f"pyspf-{pyspf_version()}"
    files = {name: target / name for name in SUITES}
    if not all(path.is_file() for path in files.values()):
        _download(target)
    return files


def _download(target: Path) -> None:
    version = pyspf_version()
    with tempfile.TemporaryDirectory(prefix="pyspf-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "15",
               "-q", f"pyspf=={version}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SuiteUnavailable(f"pip download pyspf=={version} failed: {exc}") from exc
        sdists = sorted(Path(tmp).glob("pyspf-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SuiteUnavailable(
                f"pip download pyspf=={version} failed (rc={done.returncode}): "
                + " | ".join(detail))
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0], "r:gz") as sdist:
            for member in sdist.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and member.name.endswith(f"/test/{name}") and name in SUITES:
                    data = sdist.extractfile(member)
                    assert data is not None
                    # write-then-rename: concurrent test runs never see half a file
                    partial = target / f".{name}.{os.getpid()}.part"
                    partial.write_bytes(data.read())
                    partial.replace(target / name)
    missing = [name for name in SUITES if not (target / name).is_file()]
    if missing:
        raise SuiteUnavailable(f"pyspf {version} sdist has no {', '.join(missing)}")


def load_cases(path: Path) -> list[SuiteCase]:
    cases: list[SuiteCase] = []
    with path.open("rb") as fp:
        for scenario in yaml.safe_load_all(fp):
            if not scenario:
                continue
            for name, test in scenario["tests"].items():
                result = test["result"]
                results = tuple(result) if isinstance(result, list) else (result,)
                explanation = test.get("explanation")
                cases.append(SuiteCase(
                    file=path.name, scenario=str(scenario.get("description", "")), name=name,
                    spec=str(test.get("spec", "")), helo=str(test["helo"]),
                    host=str(test["host"]), mailfrom=str(test["mailfrom"]), results=results,
                    explanation=None if explanation is None else str(explanation),
                    zonedata=scenario.get("zonedata") or {}))
    return cases
