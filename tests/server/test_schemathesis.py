"""Property-based fuzzing of the OpenAPI schema with schemathesis: no input may produce a 5xx.

The app runs on the tiny model under uvicorn on 127.0.0.1, so requests go through
real HTTP, the body limit and the lifespan like in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.server.helpers import make_app

# Examples per operation: about 15 operations at this count take under a minute on 2 CPU cores.
MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_model) -> Iterator[schemathesis.BaseSchema]:
    app = make_app(tmp_path_factory.mktemp("fuzz"), tiny_model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    server.should_exit = True
    thread.join(30)


# NOTE: schemathesis 4.32's pytest integration (schemathesis.pytest.from_fixture) fails under pytest 9.2
# with "'Function' object has no attribute '_nodeid'", so each operation's strategy is driven with
# hypothesis directly.
def test_no_input_causes_a_server_error(api_schema):
    failures, operations = {}, 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        try:
            check()
        except Exception as exc:  # one operation's failure must not hide the others'
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]

    assert operations >= 10
    assert failures == {}
