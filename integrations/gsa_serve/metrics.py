"""The performance monitor: Prometheus metrics of one server (``GET /metrics``).

Why a registry per server instead of prometheus-client's global one: two servers in one process (the
tests, the benchmark) never share counters. The engine thread and the HTTP side update the same
objects; prometheus-client's metrics are thread-safe.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets in seconds, from a tiny model's sub-millisecond steps to a long prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports, registered on its own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gsa_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.generations = Counter("gsa_generations", "Generations ended, by finish reason "
                                   "(stop, length, cancelled, error)", ["finish_reason"], registry=r)
        self.ttft = Histogram("gsa_time_to_first_token_seconds", "From a request's arrival at the engine to its "
                              "first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gsa_inter_token_latency_seconds", "Between two consecutive tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("gsa_decode_step_seconds", "One batched decode step (one forward for every active "
                              "session)", buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("gsa_generated_tokens", "Tokens generated (rate() of it is tokens/s)",
                                        registry=r)
        self.prompt_tokens = Counter("gsa_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefilled_tokens = Counter("gsa_prefilled_tokens", "Prompt tokens run through the model (the rest "
                                        "came from the prefix cache)", registry=r)
        self.tokens_per_second = Gauge("gsa_decode_tokens_per_second", "Tokens per second of the last decode step "
                                       "(batch size / step time)", registry=r)
        self.queue_depth = Gauge("gsa_queue_depth", "Requests waiting for a session slot", registry=r)
        self.active_sessions = Gauge("gsa_active_sessions", "Sessions holding a slot (prefilling or decoding)",
                                     registry=r)
        self.batch_size = Gauge("gsa_batch_size", "Sessions in the last decode step", registry=r)
        self.batch_sizes = Histogram("gsa_batch_size_steps", "Sessions per decode step", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.state_bytes = Gauge("gsa_state_bytes", "Bytes of the active sessions' pasts (recurrent states, "
                                 "kept windows, or every key of a KV cache)", registry=r)
        self.prefix_hits = Counter("gsa_prefix_cache_hits", "Prompts that continued a cached prefix state",
                                   registry=r)
        self.prefix_misses = Counter("gsa_prefix_cache_misses", "Prompts with no cached prefix", registry=r)
        self.prefix_hit_tokens = Counter("gsa_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                                         "cache (not prefilled)", registry=r)
        self.prefix_bytes = Gauge("gsa_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.prefix_entries = Gauge("gsa_prefix_cache_entries", "Prefix states held", registry=r)
        self.prefix_evictions = Counter("gsa_prefix_cache_evictions", "Prefix states evicted (least recently "
                                        "used first) to stay within the byte bound", registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]
