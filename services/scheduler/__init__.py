"""The scheduler: the pure core that decides every step (`Scheduler`, with the request it
tracks and its configuration) and, in `service.py`, the process that runs it between the
gateways and the executor."""

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.policy import QueueFullError
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.services.scheduler.scheduler import Scheduler

__all__ = ["QueueFullError", "Request", "RequestStatus", "Scheduler", "SchedulerConfig"]
