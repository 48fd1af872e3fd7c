"""``KvloftConnector``: vLLM's KV connector (v1 API) backed by a kvloft server.

One instance runs in vLLM's scheduler (role ``SCHEDULER``: lookups and the step plan) and one in
each worker (role ``WORKER``: the worker's KV memory, loads and saves). Both talk to kvloft over
its Unix socket through a :class:`~kvloft.vllm.link.Link` that keeps vLLM serving while kvloft is
down. With ``load_mode = "async"`` (the default) a request with a kvloft hit waits in
``WAITING_FOR_REMOTE_KVS`` while kvloft copies; with ``"sync"`` it runs in the step that loads
it, each attention layer waiting for its own layer's copy (on a GPU, on the GPU). A failed load
makes vLLM recompute the blocks. On a GPU each layer's save waits for an event recorded after
that layer's attention, so saves copy while later layers compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from ..client import Client
from ..errors import ProtocolMismatch, ServerUnavailable
from ..namespace import Namespace
from . import stats
from .config import ConnectorConfig
from .identity import engine_namespace
from .layout import LayoutError, TensorGeometry, block_shape, describe
from .link import Link, Memory
from .plan import Planner, StepPlan
from .transfers import Transfers

try:  # vLLM 0.32 labels external hits by tier.
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    _HOST_SOURCE: Any = CacheHitSource.HOST
except ImportError:  # pragma: no cover - older vLLM
    _HOST_SOURCE = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm" so that vLLM's logging configuration applies to the connector's records.
log = logging.getLogger("vllm.kvloft")


@dataclass
class KvloftMetadata(KVConnectorMetadata):
    """Scheduler to workers, once per step: the step's loads, saves, preemptions and
    requests whose blocks wait for their saves."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class KvloftHandshake(KVConnectorHandshakeMetadata):
    """Worker to scheduler, once at start: the namespace the worker registered (``None``
    when the worker's connector is off, with the reason)."""

    namespace: dict[str, Any] | None = None
    reason: str = ""


@dataclass
class KvloftStats(KVConnectorStats):
    """The connector's figures for one interval (see :mod:`kvloft.vllm.stats`)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = stats.empty()

    def reset(self) -> None:
        self.data = stats.empty()

    def aggregate(self, other: KVConnectorStats) -> KvloftStats:
        return KvloftStats(data=stats.merge(self.data, other.data))

    def reduce(self) -> dict[str, int | float]:
        return stats.summary(self.data)

    def is_empty(self) -> bool:
        return stats.is_empty(self.data)


class KvloftPromMetrics(KVConnectorPromMetrics):
    """The connector's figures as Prometheus metrics on vLLM's endpoint: ``vllm:kvloft_*``
    counters (hit tokens and blocks, loads, saves, failures) and latency histograms."""

    COUNTERS = {
        "hit_tokens": "Prompt tokens found in kvloft (beyond vLLM's own prefix cache)",
        "hit_blocks": "Blocks found in kvloft by lookups",
        "lookup_blocks": "Blocks looked up in kvloft",
        "loaded_blocks": "Blocks loaded from kvloft",
        "load_failures": "Loads from kvloft that failed (their blocks were recomputed)",
        "saved_blocks": "Blocks saved into kvloft",
        "save_failed_blocks": "Blocks kvloft could not save",
        "errors": "Requests to kvloft that failed",
    }
    HISTOGRAMS = {"lookup_s": "lookup", "load_s": "load", "save_s": "save"}
    BUCKETS = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str], per_engine_labelvalues: dict):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            key: self.create_metric_per_engine(
                self._counter_cls(name=f"vllm:kvloft_{key}", documentation=doc, labelnames=labelnames)
            )
            for key, doc in self.COUNTERS.items()
        }
        self._histograms = {
            key: self.create_metric_per_engine(
                self._histogram_cls(
                    name=f"vllm:kvloft_{name}_seconds",
                    documentation=f"Seconds a kvloft {name} took, from request to completion",
                    labelnames=labelnames,
                    buckets=self.BUCKETS,
                )
            )
            for key, name in self.HISTOGRAMS.items()
        }

    def create_metric_per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            value = int(transfer_stats_data.get(key, 0) or 0)
            if value:
                per_engine[engine_idx].inc(value)
        for key, per_engine in self._histograms.items():
            for seconds in transfer_stats_data.get(key, ()) or ():
                per_engine[engine_idx].observe(float(seconds))


class KvloftConnector(KVConnectorBase_V1):
    """vLLM KV connector for kvloft. Select it with
    ``--kv-transfer-config '{"kv_connector": "KvloftConnector", "kv_role": "kv_both",
    "kv_connector_module_path": "kvloft.vllm"}'``; settings go in
    ``kv_connector_extra_config`` (see :class:`~kvloft.vllm.config.ConnectorConfig`)."""

    _cache_hit_source = _HOST_SOURCE

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.config = ConnectorConfig.from_sources(extra)
        self.instance = str(self._kv_transfer_config.engine_id)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.counters = stats.ConnectorCounters()
        self.disabled_reason = ""
        self._planner: Planner | None = None
        self._transfers: Transfers | None = None
        self._handshake = KvloftHandshake(reason="register_kv_caches was not called")
        self._gpu = False
        #: The GPU worker's per-layer events (layer-wise loads and saves).
        self._layer_events: Any = None
        #: Attention layer name to its index in the registered memory.
        self._layer_index: dict[str, int] = {}
        groups = getattr(kv_cache_config, "kv_cache_groups", None) if kv_cache_config is not None else None
        if groups is not None and len(groups) != 1:
            self.disabled_reason = (
                f"the model has {len(groups)} KV-cache groups (hybrid attention); kvloft serves single-group models"
            )
        elif not vllm_config.cache_config.enable_prefix_caching:
            self.disabled_reason = "prefix caching is off (--no-enable-prefix-caching): requests have no block hashes"
        self._check_server_version()
        if role == KVConnectorRole.SCHEDULER and self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # kvloft is a cache: a load that fails is a miss, recomputed, never an error for the
            # request. vLLM reads the policy after it creates the scheduler's connector.
            log.info("kvloft connector: kv_load_failure_policy set to 'recompute' (a failed load is a cache miss)")
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        if self.disabled_reason:
            log.warning("kvloft connector is off: %s", self.disabled_reason)
            return
        if role == KVConnectorRole.SCHEDULER:
            link = self._link(namespace=None, memory=None, name="vllm-scheduler")
            self._planner = Planner(
                link,
                self.block_size,
                hashes_per_block=self._hashes_per_block(vllm_config, kv_cache_config),
                loads=self.config.loads,
                saves=self.config.saves,
                async_loads=self.config.load_mode == "async",
                min_lookup_blocks=self.config.min_lookup_blocks,
                counters=self.counters,
            )
        log.info("kvloft connector (%s, %s) for instance %s via %s", role.name.lower(), self.config.mode,
                 self.instance, self.config.socket_path)

    # -- helpers --------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped save only costs a future miss.
        return False

    def _link(self, namespace: Namespace | None, memory: Memory | None, name: str) -> Link:
        return Link(
            self.config.socket_path,
            self.instance,
            namespace,
            memory=memory,
            timeout=self.config.request_timeout_s,
            backoff=(self.config.reconnect_initial_s, self.config.reconnect_max_s),
            client_name=name,
        )

    def _check_server_version(self) -> None:
        """A protocol mismatch is a configuration error: fail at start. An absent server is
        not: vLLM serves without kvloft until it appears."""
        try:
            with Client(self.config.socket_path, timeout=self.config.request_timeout_s, client_name="vllm-probe"):
                pass
        except ProtocolMismatch as e:
            raise RuntimeError(f"kvloft connector: {e}") from None
        except ServerUnavailable as e:
            log.warning("kvloft connector: %s; vLLM serves without kvloft until it starts", e)
        except Exception as e:  # noqa: BLE001 - any other failure: also served without kvloft
            log.warning("kvloft connector: could not reach kvloft at %s (%s)", self.config.socket_path, e)

    @staticmethod
    def _hashes_per_block(vllm_config: Any, kv_cache_config: Any) -> int:
        try:
            from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

            block, hash_block = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
        except Exception:  # noqa: BLE001 - older vLLM: hashes are per block
            return 1
        if hash_block <= 0 or block % hash_block:
            return 1
        return block // hash_block

    def _meta(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KvloftMetadata) else None

    # ==============================================================================
    # Worker side
    # ==============================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.disabled_reason:
            self._handshake = KvloftHandshake(reason=self.disabled_reason)
            return
        tensors = list(kv_caches.values())
        if not tensors:
            self._handshake = KvloftHandshake(reason="no KV-cache layers")
            return
        device = tensors[0].device
        num_blocks = int(self._kv_cache_config.num_blocks)
        try:
            shape = block_shape(TensorGeometry.of(tensors[0]), num_blocks)
            if device.type == "cuda":
                # The cuda backend: kvloft opens the tensors' allocations by CUDA IPC.
                from ..gpu import cuda_layers

                layers, ipc, uuid = cuda_layers(tensors, num_blocks)
                memory_of = lambda rank: Memory(rank, layers, f"cuda:{device.index or 0}", gpu_uuid=uuid, ipc=ipc)  # noqa: E731
                self._gpu = True
            elif device.type == "cpu":
                layers = [describe(TensorGeometry.of(t), num_blocks) for t in tensors]
                memory_of = lambda rank: Memory(rank, layers, "cpu")  # noqa: E731
            else:
                raise LayoutError(f"KV cache on {device}: kvloft serves CPU and CUDA memory")
        except (LayoutError, ValueError) as e:
            log.warning("kvloft connector is off: %s", e)
            self._handshake = KvloftHandshake(reason=str(e))
            return
        namespace = engine_namespace(self._vllm_config, len(layers), shape, device.type)
        rank = _rank()
        link = self._link(namespace, memory_of(rank), f"vllm-worker-{rank}")
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        if self._gpu:
            from ..gpu import LayerEvents

            self._layer_events = LayerEvents(len(layers), device)
        self._transfers = Transfers(link, load_timeout_s=self.config.load_timeout_s, counters=self.counters,
                                    layer_events=self._layer_events)
        try:
            link.client()  # register now when kvloft is up; otherwise on first use
        except Exception as e:  # noqa: BLE001 - a refused registration is a configuration error
            raise RuntimeError(f"kvloft connector: registering the KV cache failed: {e}") from None
        self._handshake = KvloftHandshake(namespace=namespace.to_wire())
        log.info("kvloft connector: rank %d registered %d layers of %d blocks (%s)", rank, len(layers), num_blocks,
                 namespace.variant)

    def get_handshake_metadata(self) -> KvloftHandshake:
        return self._handshake

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._transfers is None or not isinstance(kv_connector_metadata, KvloftMetadata):
            return
        if kv_connector_metadata.plan.preempted:
            self._transfers.wait_for_saves(kv_connector_metadata.plan.preempted)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._layer_events is not None:
            self._layer_events.reset_saves()  # a new step: no layer has written yet

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._meta()
        if self._transfers is not None and plan is not None and plan.loads:
            self._transfers.start_loads(plan.loads, sync=self.config.load_mode == "sync")

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Asynchronous loads completed before their request ran: only synchronous ones wait.
        if self._transfers is not None:
            self._transfers.wait_layer(self._layer_index.get(layer_name))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        # The save itself is one request per step (wait_for_save); on a GPU each layer's copy
        # waits for the event recorded here, after the kernels that wrote the layer.
        if self._layer_events is not None:
            self._layer_events.record_save(self._layer_index.get(layer_name))

    def wait_for_save(self) -> None:
        plan = self._meta()
        if self._transfers is None or plan is None:
            return
        if plan.saves:
            after, per_layer = None, None
            if self._layer_events is not None:
                # kvloft copies on its own stream, behind events recorded on this one: per
                # layer when every layer recorded one this step, else one recorded now.
                after, per_layer = self._layer_events.save_order()
            self._transfers.start_saves(plan.saves, after_event=after, layer_events=per_layer)
        elif self._layer_events is not None:
            self._layer_events.reset_saves()
        if plan.delayed_free:
            self._transfers.mark_delayed(plan.delayed_free)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._transfers is None:
            return None, None
        done = self._transfers.poll()
        return (done.sending or None), (done.recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._transfers.take_failed_blocks() if self._transfers is not None else set()

    def get_kv_connector_stats(self) -> KvloftStats | None:
        data = self.counters.take()
        return KvloftStats(data=data) if data is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvloftStats:
        return KvloftStats(data=data or stats.empty())

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvloftPromMetrics:
        return KvloftPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._transfers is not None:
            self._transfers.drain(timeout=5.0)
            self._transfers.link.close()
        if self._planner is not None:
            self._planner.link.close()

    # ==============================================================================
    # Scheduler side
    # ==============================================================================

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self._planner is None:
            return
        namespaces = []
        for rank, meta in sorted(metadata.items()):
            if not isinstance(meta, KvloftHandshake) or meta.namespace is None:
                reason = getattr(meta, "reason", "") or "no handshake"
                log.warning("kvloft connector is off: worker %s did not register (%s)", rank, reason)
                self._planner = None
                return
            namespaces.append(meta.namespace)
        if not namespaces:
            return
        if any(ns != namespaces[0] for ns in namespaces[1:]):
            log.error("kvloft connector is off: the workers registered different namespaces: %s", namespaces)
            self._planner = None
            return
        self._planner.link.namespace = Namespace.from_wire(namespaces[0])

    def on_new_request(self, request: Request) -> None:
        if self._planner is not None:
            self._planner.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._planner is None:
            return 0, False
        return self._planner.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self._planner is None:
            return
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else ()
        self._planner.after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self._planner is None:
            return KvloftMetadata()
        manager = self._kv_cache_manager

        def block_ids_of(req_id: str) -> list[int]:
            if manager is None:
                return []
            return list(manager.get_block_ids(req_id)[0])

        plan = self._planner.build(
            scheduler_output.num_scheduled_tokens,
            scheduler_output.scheduled_spec_decode_tokens or {},
            scheduler_output.preempted_req_ids or (),
            block_ids_of,
        )
        return KvloftMetadata(plan=plan)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is None:
            return False, None
        return self._planner.finished(request, block_ids), None


def _rank() -> int:
    """This worker's rank in the instance: ``pp_rank * tp_size + tp_rank``."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp = get_tp_group()
        return get_pp_group().rank_in_group * tp.world_size + tp.rank_in_group
    except Exception:  # noqa: BLE001 - no parallel state (single process)
        return 0
