"""The batching engine, one module per part of a request's life (vLLM v1's cut):

- ``model_thread``: ``Engine``, where Celery task threads submit and the model thread loops.
- ``core``: ``EngineCore``, the request lifecycle: admit, plan, run a step, update, finish, recover.
- ``strategies``: the planning plug-ins, dynamic (run groups to the end) and continuous
  (join and leave at every decode step); ``scheduler``: their pure batching policy.
- ``runner``: what the core asks of a model runner (Protocols) and the row bookkeeping they share;
  ``model_runner`` (batched ``generate``), ``kv_slab`` (the continuous running batch) and
  ``sampling`` are the torch side.
- ``sinks``: the output, cancel and counter roles; ``stats``: the counters; ``build``: ``make_engine``.

Importing this package does not import torch (the torch side is reached through ``build``).
"""

from worker.engine.core import EngineCore, RenderFn, Submission
from worker.engine.model_thread import Engine
from worker.engine.sinks import CancelFlags, EngineSinks, ExecutionCounter, StreamOutput

__all__ = ["CancelFlags", "Engine", "EngineCore", "EngineSinks", "ExecutionCounter", "RenderFn", "StreamOutput",
           "Submission"]
