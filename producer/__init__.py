"""Clients of the farm: ``FarmClient`` (Python API) and the ``farm submit``/``farm job`` CLI."""

from producer.client import FarmClient, RequestHandle, RequestStatus
from producer.jobs import Job, JobProgress

__all__ = ["FarmClient", "Job", "JobProgress", "RequestHandle", "RequestStatus"]
