"""Prometheus metrics: HTTP traffic, request latencies, engine state and GPU health.

Engine and GPU figures are read at scrape time by collectors, so a scrape always
shows the current state and nothing polls in the background.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import cast
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.reports import EngineStats, SpecDecodeCounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# prometheus_client's multiprocess mode: set (by server/api_servers.py) before the API processes import it,
# their counters and histograms live in files there, which any one of them sums when scraped
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

EngineGauge = Callable[[EngineStats], float | None]  # None: the engine does not report it (a feature that is off)


def _spec(read: Callable[[SpecDecodeCounters], float]) -> EngineGauge:
    return lambda stats: None if stats.spec_decode is None else read(stats.spec_decode)


# metric name -> (help, kind, how it is read from EngineStats)
_ENGINE_STATS: dict[str, tuple[str, str, EngineGauge]] = {
    "minerva_queue_length": ("Requests waiting to be scheduled", "gauge", lambda s: s.num_waiting),
    "minerva_running_sequences": ("Sequences running in the engine", "gauge", lambda s: s.num_running),
    "minerva_kv_blocks_used": ("KV-cache blocks in use", "gauge", lambda s: s.kv_blocks_used),
    "minerva_kv_blocks_free": ("KV-cache blocks free", "gauge", lambda s: s.kv_blocks_free),
    "minerva_kv_cache_tokens": ("Tokens the KV cache holds (every tensor-parallel rank together)", "gauge",
                                lambda s: s.kv_cache_tokens),
    "minerva_kv_cache_bytes": ("KV-cache memory over every tensor-parallel rank", "gauge", lambda s: s.kv_cache_bytes),
    "minerva_tensor_parallel_size": ("Ranks (GPUs or CPU processes) the model is split over", "gauge",
                                     lambda s: s.tensor_parallel_size),
    "minerva_prefix_cache_hit_rate": ("Share of prompt tokens served from the prefix cache", "gauge",
                                      lambda s: s.prefix_cache_hit_rate),
    "minerva_preemptions": ("Sequences preempted for lack of KV blocks", "counter", lambda s: s.num_preemptions),
    "minerva_prompt_tokens": ("Prompt tokens taken in", "counter", lambda s: s.prompt_tokens_total),
    "minerva_generation_tokens": ("Tokens generated", "counter", lambda s: s.generation_tokens_total),
    "minerva_engine_steps": ("Engine steps taken", "counter", lambda s: s.steps_total),
    "minerva_model_load_seconds": ("Seconds the model took to load", "gauge", lambda s: s.model_load_seconds),
    # speculative decoding (vLLM's spec_decode_* names); absent when it is off
    "minerva_spec_decode_num_drafts": ("Sequence-steps that verified drafted tokens", "counter",
                                       _spec(lambda c: c.num_drafts)),
    "minerva_spec_decode_num_draft_tokens": ("Drafted tokens verified", "counter", _spec(lambda c: c.num_draft_tokens)),
    "minerva_spec_decode_num_accepted_tokens": ("Drafted tokens accepted", "counter",
                                                _spec(lambda c: c.num_accepted_tokens)),
    "minerva_spec_decode_acceptance_rate": ("Accepted / drafted tokens", "gauge", _spec(lambda c: c.acceptance_rate)),
    "minerva_spec_decode_mean_acceptance_length": ("Tokens emitted per verified sequence-step (accepted drafts + 1)",
                                                   "gauge", _spec(lambda c: c.mean_acceptance_length)),
    "minerva_spec_decode_propose_seconds": ("Host time spent proposing drafts", "counter",
                                            _spec(lambda c: c.propose_seconds)),
}
_ACCEPTED_PER_POSITION = ("minerva_spec_decode_num_accepted_tokens_per_pos",
                          "Drafted tokens accepted at each draft position")

StatsSource = Callable[[], Mapping[str, EngineStats]]


class EngineCollector(Collector):
    """Reads every served model's `engine.stats()` when Prometheus scrapes."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        per_model = self._stats()
        for name, (help_text, kind, read) in _ENGINE_STATS.items():
            family = (
                GaugeMetricFamily(name, help_text, labels=["model"])
                if kind == "gauge"
                else CounterMetricFamily(name, help_text, labels=["model"])
            )
            for model, stats in per_model.items():
                if (value := read(stats)) is not None:
                    family.add_metric([model], float(value))
            yield family
        name, help_text = _ACCEPTED_PER_POSITION
        family = CounterMetricFamily(name, help_text, labels=["model", "position"])
        for model, stats in per_model.items():
            for position, count in enumerate(stats.spec_decode.accepted_per_position if stats.spec_decode else ()):
                family.add_metric([model, str(position)], float(count))
        yield family


class GpuCollector(Collector):
    """GPU memory, utilisation and temperature via NVML; yields nothing without a GPU."""

    def __init__(self) -> None:
        self._nvml = _init_nvml()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            return
        nvml = self._nvml
        used = GaugeMetricFamily("minerva_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("minerva_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        util = GaugeMetricFamily("minerva_gpu_utilization_ratio", "GPU busy share over the last sample", labels=["gpu"])
        temp = GaugeMetricFamily("minerva_gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([str(i)], float(memory.used))
            total.add_metric([str(i)], float(memory.total))
            util.add_metric([str(i)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            temp.add_metric([str(i)], float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        yield from (used, total, util, temp)


def _init_nvml() -> ModuleType | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return cast(ModuleType, pynvml)  # pynvml ships no types
    except Exception:  # no driver, no GPU, or no library: the metrics are simply absent
        return None


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, engine_stats: StatsSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minerva_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_latency = Histogram(
            "minerva_http_request_duration_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "minerva_time_to_first_token_seconds", "Time to first token", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "minerva_time_per_output_token_seconds", "Time per output token after the first", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "minerva_e2e_request_latency_seconds", "End-to-end generation latency", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        engine = EngineCollector(engine_stats)
        self.gpu = GpuCollector()
        r.register(engine)
        r.register(self.gpu)
        self._scraped = r
        if os.environ.get(MULTIPROCESS_DIR):  # several API processes: the HTTP counters of them all, summed
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped)
            self._scraped.register(engine)
            self._scraped.register(self.gpu)

    def observe_generation(self, model: str, longest_sample: int, ttft: float | None, e2e: float) -> None:
        """Record one finished generation (streamed or not); token totals come from the engine itself.

        Time per output token follows the longest sample: the samples of one request decode side by side.
        """
        self.e2e.labels(model).observe(e2e)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if longest_sample > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (longest_sample - 1))

    def render(self) -> bytes:
        return generate_latest(self._scraped)
