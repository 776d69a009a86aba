"""The Celery app factory shared by clients and workers. No global app: callers pass it around."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Queue

from protocol.names import INTERACTIVE_QUEUE, QUEUES
from protocol.results import BACKEND as FIRST_RESULT_BACKEND
from protocol.settings import FarmSettings


def make_celery(settings: FarmSettings, name: str = "batchfarm", queues: Iterable[str] = ()) -> Celery:
    """A Celery app configured for the farm's contract (json only, late acks, the plain queues
    and ``queues``: a worker's model queues, which it must declare to consume them)."""
    app = Celery(name, broker=settings.redis_url, backend=f"{FIRST_RESULT_BACKEND}+{settings.redis_url}",
                 set_as_current=False)
    app.conf.update(celery_config(settings, queues))
    return app


def celery_queue(name: str) -> Queue:
    """A queue to send to by object: per-model queues are not all declared in a client's app,
    and Celery looks a queue given by name up among those (``task_create_missing_queues`` off)."""
    return Queue(name, routing_key=name)


def celery_config(settings: FarmSettings, queues: Iterable[str] = ()) -> dict[str, object]:
    """Celery settings; each is part of the farm's safety contract (docs/DESIGN.md, "Celery settings")."""
    transport = {
        # Above the longest batch, so a slow batch is not redelivered while it still runs.
        "visibility_timeout": settings.visibility_timeout,
        # Poll queues in the order given to the worker (interactive first), not round robin.
        "queue_order_strategy": "priority",
        # Look for messages whose worker died (unacked past the visibility timeout) at every
        # 10 s tick, not every 10th tick (kombu's default): redelivery within seconds of it.
        "unacked_restore_throttle": 1,
        # The lock around that scan outlives a worker killed while holding it; kombu's 300 s
        # would pause every redelivery for five minutes. A scan takes milliseconds.
        "unacked_mutex_expire": 15,
        # A Redis that accepts and never answers is a broken connection within seconds.
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
    }
    return {
        # json only: pickle would let anyone who can write to Redis run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the result is stored; a worker that dies loses nothing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # Prefetch is bounded by the pool size (max_inflight threads) times one.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.max_inflight,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "redis_socket_timeout": settings.redis_socket_timeout,
        "redis_socket_connect_timeout": settings.redis_connect_timeout,
        # Ride out a Redis restart: storing a result and publishing a message retry with backoff.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 20, "interval_start": 0.1, "interval_step": 0.5,
                                      "interval_max": 2.0},
        "result_expires": settings.result_expires,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_queues": [celery_queue(q) for q in dict.fromkeys((*QUEUES, *queues))],
        "task_default_queue": INTERACTIVE_QUEUE,
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }
