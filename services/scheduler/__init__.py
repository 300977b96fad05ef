"""The scheduler: the pure core that decides every step (`Scheduler`, with the request it
tracks and its configuration) and, in `service.py`, the process that runs it between the
gateways and the executor."""

from services.scheduler.config import PreemptionMode, SchedulerConfig
from services.scheduler.policy import QueueFullError
from services.scheduler.request import Request, RequestStatus
from services.scheduler.scheduler import Scheduler

__all__ = ["PreemptionMode", "QueueFullError", "Request", "RequestStatus", "Scheduler", "SchedulerConfig"]
