"""The LLM server: one replica owns one engine, its model workers and a bounded queue.

A plain class, so that tests and benches run it in process; deployments/app.py deploys it with
`serve.deployment(LLMServer)`. Serve calls `check_health`, `record_routing_stats` and
`record_autoscaling_stats` on it by name, and `__del__` after draining requests in flight; the
ingress broadcasts `stats` (/health) and `metrics_snapshot` (/metrics) to every replica.
Errors never escape `generate` as exceptions: they come back as one `ServeError` item, so the
ingress gets the param / code / status intact instead of a pickled Ray traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any


from autoscaler.signal import ReplicaSignal
from cluster.config import LongctxConfig, load_config_dict
from deployments.admission import AdmissionQueue
from deployments.messages import (
    GenerateRequest,
    ServeError,
    engine_failure,
    invalid_request,
    overloaded,
    replica_unavailable,
    request_failure,
)
from engine.async_engine import EngineDeadError
from engine.gc_pauses import ProcessGcMetrics, freeze_startup_objects
from engine.serving import serving_engine
from engine.outputs import CompletionDelta, RequestFailedError
from engine.scheduler import QueueFullError
from protocol.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

Reply = list[CompletionDelta] | ServeError


class LLMServer:
    def __init__(self, config: LongctxConfig | dict[str, Any], own_process: bool = False):
        """`own_process`: this replica is what its process is for (a Serve replica, not a test's
        object): once started, its objects are frozen out of garbage collection, and the process's
        collections are counted (engine/gc_pauses.py)."""
        self.config = config if isinstance(config, LongctxConfig) else load_config_dict(config)
        settings = self.config.serve
        _log_progress_to_stderr()  # first: an engine in a child process logs as this process does
        self.engine = serving_engine(self.config)
        self.admission = AdmissionQueue(settings.max_queued_requests, settings.max_queued_tokens)
        self.replica_id = _replica_id()
        for line in self.summary_lines():
            logger.info("replica %s: %s", self.replica_id, line)
        # This process's own collections (HTTP, streams, preparing), exported with the replica's series.
        self.gc_metrics = ProcessGcMetrics() if own_process else None
        if self.gc_metrics is not None:
            self.gc_metrics.pauses.install()
            freeze_startup_objects()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Reply]:
        if not self.engine.is_alive:  # it stopped before this request came: another replica can serve it
            yield replica_unavailable("this replica's engine has stopped; it is being replaced",
                                      self.config.serve.retry_after_s)
            return
        ticket = self.admission.try_admit(len(request.prompt_token_ids))
        if ticket is None:
            yield self._overloaded("this replica's queue is full")
            return
        try:
            params = self._params(request)
            # Every delta ready at once: one Serve message per step, not one per token. Closed
            # here when the caller leaves, so the engine aborts the request before its next step.
            batches = self.engine.stream(request.request_id, request.prompt_token_ids, params, request.cache_salt)
            async with aclosing(batches):
                async for batch in batches:
                    self.admission.leave(ticket)
                    yield batch
        except InvalidParameterError as error:
            yield invalid_request(str(error), error.param, getattr(error, "code", None))
        except QueueFullError as error:
            yield self._overloaded(str(error))
        except RequestFailedError as error:
            yield request_failure(str(error))
        except EngineDeadError as error:
            yield engine_failure(str(error))
        except Exception as error:
            logger.exception("request %s failed", request.request_id)
            yield engine_failure(f"internal error: {error!r}")
        finally:
            self.admission.leave(ticket)

    def _params(self, request: GenerateRequest) -> SamplingParams:
        """The client's params; with no max_tokens from it, the default bounded by the room left."""
        if not request.fill_max_tokens:
            return request.params
        stats = self.engine.stats()
        capacity = min(self.engine.max_model_len, stats.num_total_kv_blocks * stats.block_size)
        room = max(1, capacity - len(request.prompt_token_ids))
        return dataclasses.replace(request.params, max_tokens=min(request.params.max_tokens, room))

    def _overloaded(self, reason: str) -> ServeError:
        queue = self.admission
        message = f"{reason} ({queue.num_requests} requests, {queue.num_tokens} prompt tokens queued); retry later"
        return overloaded(message, self.config.serve.retry_after_s)

    def set_arrival_gap(self, arrival_gap_s: float) -> float:
        """This replica's engine's `arrival_gap_s`, changed without a restart (a redeploy would
        reload the model: ~25 s on an H100): bench/serve_load.py --arrival-gap-ab calls it through
        a Serve handle between runs. Not on the HTTP API. Returns the gap now in force."""
        self.engine.set_arrival_gap(arrival_gap_s)
        logger.info("replica %s: arrival_gap_s set to %g", self.replica_id, arrival_gap_s)
        return self.engine.arrival_gap_s

    # --- observability and Serve hooks ---------------------------------------------------
    def summary_lines(self) -> list[str]:
        """What this replica serves and holds (engine/summary.py); `longctx serve` prints it."""
        return dataclasses.replace(self.engine.summary(), redis_up=self.engine.stats().kv_redis_up).lines()

    def stats(self) -> dict[str, Any]:
        """Engine and queue state; the ingress's /metrics and /health read it from every replica."""
        return {
            "replica": self.replica_id,
            "alive": self.engine.is_alive,
            "queued_requests": self.admission.num_requests,
            "queued_prompt_tokens": self.admission.num_tokens,
            **dataclasses.asdict(self.engine.stats()),
        }

    async def metrics_snapshot(self) -> dict[str, Any]:
        """stats() plus this replica's own Prometheus series (the engine's KV-tier registry) as
        exposition text: they live in the engine's process, so the ingress's /metrics re-exports
        them labelled by replica (deployments/metrics.py). Awaited: with the engine in a child
        process the text comes back after the step in progress, and the replica's loop serves on."""
        exposition = await self.engine.metrics_exposition()
        if self.gc_metrics is not None:
            exposition += self.gc_metrics.exposition()
        return {**self.stats(), "exposition": exposition}

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            "queued_prompt_tokens": self.admission.num_tokens,
            "running_kv_tokens": stats.num_running_kv_tokens,
            "free_kv_blocks": stats.num_free_kv_blocks,
            "reported_at": time.time(),  # the router drops its own estimates older than this
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The queued-context policy's signal (autoscaler/signal.py), pushed to Serve's controller
        every autoscaling.metrics_push_interval_s, plus queue and KV figures for dashboards."""
        stats = self.engine.stats()
        signal = ReplicaSignal(
            pending_prefill_tokens=stats.num_pending_prefill_tokens,
            pending_prefill_s=stats.pending_prefill_s,
            running_kv_tokens=stats.num_running_kv_tokens,
            kv_capacity_tokens=stats.num_total_kv_blocks * stats.block_size,
            num_decoding=stats.num_decoding,
            longest_request_tokens=stats.longest_request_tokens,
        )
        return {
            **signal.as_metrics(),
            "queued_prompt_tokens": float(self.admission.num_tokens),
            "queued_requests": float(self.admission.num_requests),
            "num_running": float(stats.num_running),
            "kv_usage": 1.0 - stats.num_free_kv_blocks / max(1, stats.num_total_kv_blocks),
        }

    def check_health(self) -> None:
        """Raise when the engine cannot serve: its loop died, or one step has run too long."""
        if not self.engine.is_alive:
            raise RuntimeError("the engine loop is not running")
        busy_s = self.engine.seconds_since_last_step()
        if busy_s > self.config.serve.stall_timeout_s:
            raise RuntimeError(f"the engine has not finished a step for {busy_s:.0f} s while requests wait")

    def __del__(self) -> None:
        gc_metrics = getattr(self, "gc_metrics", None)
        if gc_metrics is not None:
            gc_metrics.pauses.uninstall()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _log_progress_to_stderr() -> None:
    """INFO from longctx's own loggers (start-up summary, long prefills, Redis state) to stderr,
    which Ray keeps in the replica's log file; the root logger and other libraries untouched."""
    for name in ("engine", "deployments", "kvcache", "executors"):
        package_logger = logging.getLogger(name)
        if not package_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            package_logger.addHandler(handler)
            package_logger.setLevel(logging.INFO)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests, benches)
        return "local"
