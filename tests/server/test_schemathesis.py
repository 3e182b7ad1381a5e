"""Schemathesis against the OpenAPI schema of a running server: no server errors (5xx) for
any generated request, valid or not, with the admin key (so mask writes are exercised)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_support import ADMIN_KEY

OPERATIONS = [
    "POST /generate", "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions",
    "GET /masks", "PUT /masks/{name}", "GET /masks/{name}", "DELETE /masks/{name}",
    "POST /masks/{name}/build", "GET /masks/{name}/report", "GET /jobs/{job_id}",
    "POST /inspect", "GET /experts", "GET /experts/search", "GET /experts/{layer}/{i}/{j}",
    "POST /experts/build", "GET /health", "GET /ready", "GET /metrics",
    "POST /tokenize", "POST /detokenize", "GET /tokenizer_info",
]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json",
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def test_every_operation_is_fuzzed(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


def served_model(case):
    """Valid cases of /v1 name the served model (else they all stop at 404 on 'model')."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "monet-vd-tiny"
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    strategy = operation.as_strategy(mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(served_model)

    @given(case=strategy)
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)

    try:
        fuzz()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE and label.startswith("GET /") and "{" not in label
