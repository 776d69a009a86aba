"""Clients of the farm: ``FarmClient`` (Python API) and the ``farm submit``/``farm job`` CLI."""

from producer.client import FarmClient, RequestHandle, RequestStatus

__all__ = ["FarmClient", "RequestHandle", "RequestStatus"]
