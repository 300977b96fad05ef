"""`pagedserve up` warns when its HTTP port is reachable beyond this machine without keys
(issue #26): the API then serves anyone, and /admin/scheduler shows every tenant's
requests."""

from __future__ import annotations

import pytest

from pagedserve.services.launcher import exposure_warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_keys(host: str) -> None:
    assert exposure_warnings(host, None, None) == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example"])
def test_beyond_loopback_each_missing_key_is_warned_of(host: str) -> None:
    both = exposure_warnings(host, None, None)
    assert len(both) == 2 and "--api-key" in both[0] and "--admin-key" in both[1]
    assert exposure_warnings(host, "k", None) == both[1:]
    assert exposure_warnings(host, None, "a") == both[:1]
    assert exposure_warnings(host, "k", "a") == []
