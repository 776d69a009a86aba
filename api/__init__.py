"""``farm api``: the farm behind an OpenAI-compatible HTTP API (``/v1``), one more thin client.

It enqueues like ``FarmClient`` and never imports torch; it keeps no state of its own (streams,
results and per-key counters live in Redis), so any number of replicas can run behind a load
balancer. Every call that touches the farm goes through ``api.farm``.
"""
