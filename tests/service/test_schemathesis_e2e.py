"""Property-based checks of the live API against its own OpenAPI document (schemathesis).

Every operation gets a few generated requests over real HTTP, and schemathesis' checks hold
the answers to the document: no 5xx, documented status codes, content types, headers and
bodies, and auth as documented (the API-key scheme appears only when API_KEY is set, so a
keyless server is not reported as ignoring it). Bounded: at most EXAMPLES requests per
operation and BUDGET_S seconds per server.

One check is left out for the upload routes only: "schema-valid data is accepted". Their
schema says "a file" (format: binary); no schema can say "a readable chest radiograph of at
least MIN_IMAGE_SIDE px", so generated files are rightly refused with documented 4xx codes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.live_server import LiveServer, live_server

EXAMPLES = 5
BUDGET_S = 60.0
KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path) -> Iterator[LiveServer]:
    with live_server(tiny_bundle, env={"API_KEY": KEY}) as server:
        yield server


def run_schemathesis(server: LiveServer, headers: dict[str, str] | None = None) -> list[str]:
    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    until = time.monotonic() + BUDGET_S
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        failure = check_operation(server, operation, headers, until)
        if failure:
            failures.append(failure)
    assert operations >= 7, f"only {operations} operations in the document"
    return failures


def check_operation(
    server: LiveServer,
    operation: schemathesis.APIOperation,
    headers: dict[str, str] | None,
    until: float,
) -> str | None:
    uploads = "multipart/form-data" in str(operation.definition.raw.get("requestBody", {}))
    excluded = [positive_data_acceptance] if uploads else []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        if time.monotonic() > until:
            return
        case.call_and_validate(
            base_url=server.base_url, headers=headers, timeout=60, excluded_checks=excluded
        )

    try:
        check()
    except Exception as exc:  # noqa: BLE001 - collected, reported together by the caller
        return f"{operation.label}: {exc}"
    return None


def test_keyless_server_documents_no_security_scheme(server: LiveServer) -> None:
    document = httpx.get(server.url("/openapi.json")).json()
    assert "securitySchemes" not in document.get("components", {})
    assert all("security" not in op for ops in document["paths"].values() for op in ops.values())


def test_schemathesis_keyless_server(server: LiveServer) -> None:
    failures = run_schemathesis(server)
    assert not failures, "\n\n".join(failures)


def test_schemathesis_keyed_server(keyed: LiveServer) -> None:
    document = httpx.get(keyed.url("/openapi.json")).json()
    assert "ApiKey" in document["components"]["securitySchemes"]
    failures = run_schemathesis(keyed, headers={"X-API-Key": KEY})
    assert not failures, "\n\n".join(failures)
