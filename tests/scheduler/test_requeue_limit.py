"""A request that is running each time an executor is lost (issue #26) is requeued at most
--max-requeues times, then fails with an error that says why, instead of being replayed
into every restarted executor for ever. The scheduler service runs over real ZeroMQ
sockets with test_service.py's fake executors (no model: a loss is a closed socket)."""

from __future__ import annotations

from collections.abc import Callable

from tests.cluster import wait_until
from tests.scheduler.test_service import (  # noqa: F401  (start_service is a fixture)
    Service,
    all_blocks_free,
    drive,
    executor_joined,
    start_service,
    start_two_requests,
)


def _lose(service: Service, executor_name: str, num_lost: int) -> None:
    wait_until(lambda: service.gateway.status().num_executors_lost == num_lost, 20, f"{executor_name} to be declared lost")


def test_a_request_running_at_every_executor_loss_fails_after_max_requeues(start_service: Callable[..., Service]) -> None:
    service = start_service(heartbeat_timeout_s=0.3, executor_timeout_s=30, max_requeues=1)
    first = service.executor("first")
    start_two_requests(service, first, num_steps=2)
    first.take_step()
    first.close()
    _lose(service, "first", 1)
    assert service.gateway.pumped_until(lambda g: not g.errors)  # one requeue is allowed

    second = service.executor("second")
    wait_until(lambda: executor_joined(service, "second"), 5, "the second executor to join")
    second.run_step()  # both recompute their prompts + what was streamed: running again
    second.take_step()
    second.close()
    _lose(service, "second", 2)
    wait_until(lambda: service.gateway.pumped_until(lambda g: len(g.errors) == 2), 10, "both requests failed")
    errors = service.gateway.errors
    assert {e.status_code for e in errors.values()} == {500}
    assert "--max-requeues 1" in errors["a"].message and "lost 2 times" in errors["a"].message
    snapshot = service.gateway.status()
    assert not snapshot.running and not snapshot.waiting and all_blocks_free(snapshot)

    # The replica still serves: a new request completes on the next executor.
    third = service.executor("third")
    wait_until(lambda: executor_joined(service, "third"), 5, "the third executor to join")
    service.gateway.errors.clear()
    service.gateway.submit("a")
    drive(service, third, lambda g: "a" in g.finished)
    assert not service.gateway.errors
