"""The service's Prometheus metrics (served at `/metrics`, README: "Model, health, metrics").

With `captioner serve --workers N` (N > 1) every worker process writes its values to the folder the
supervisor names in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when the
library is imported), and `/metrics`, whichever worker answers it, renders all of them with
`MultiProcessCollector`: counters and histograms are summed over the workers (a dead worker's counts
stay in the totals), each gauge aggregates as its `multiprocess_mode` says (docs/scale.md has the
table). With one process nothing changes: the app's own registry is rendered.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable


def multiprocess_dir() -> str | None:
    """The multiprocess folder when this process is one of several workers (set by the supervisor), else None."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps can live in one process).

    Each gauge says how the workers' values combine (`multiprocess_mode`; ignored with one process):
    livesum for amounts each worker holds (queued images, body bytes), livemax for what is true of any
    live worker (a model version loaded, the model info, the number of keys), livemin for readiness (1
    only when every live worker is ready). The "live" modes drop a worker's values when it exits."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("captioner_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("captioner_http_request_duration_seconds", "HTTP request latency by route.",
                                 ["route", "method"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("captioner_images_captioned", "Images captioned.", registry=r)
        self.batch_size = Histogram("captioner_batch_size", "Images per engine call.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_images = Gauge("captioner_queue_images", "Images waiting for the engine (dynamic batcher queue).",
                                  registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("captioner_rejected_requests", "Requests refused or dropped by the batcher, by reason "
                                "(queue_full, deadline, client_gone; client_gone_running: the client hung up while its job "
                                "was in the engine, and its beam rows were dropped).", ["reason"], registry=r)
        # the beam search (app/inference/decoding.py): decoder step calls, the rows they decoded, and what cancellation saved
        self.decoder_steps = Counter("captioner_decoder_steps", "Decoder step calls (one per step of each engine "
                                     "call, for all its rows).", registry=r)
        self.decoder_rows = Counter("captioner_decoder_rows", "Beam rows decoded, summed over the steps.", registry=r)
        self.cancelled_rows = Counter("captioner_cancelled_rows", "Beam rows dropped from a running search because "
                                      "their client hung up.", registry=r)
        self.cancelled_images = Counter("captioner_cancelled_images", "Images whose search was given up while "
                                        "running because their client hung up.", registry=r)
        self.queue = Histogram("captioner_queue_seconds", "Time a request waited in the batcher's queue.",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.inference = Histogram("captioner_inference_seconds", "Engine time per call (encoder + search).",
                                   registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.image_errors = Counter("captioner_image_errors", "Uploads that could not be used, by error code.",
                                    ["code"], registry=r)
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warmed up.", registry=r,
                           multiprocess_mode="livemin")
        # an Info in one process; Info has no multiprocess mode, so a gauge of the same series (value 1)
        self.model = Gauge("captioner_model_info", "The model bundle served and the execution provider.",
                           ["name", "version", "provider", "device"], registry=r, multiprocess_mode="livemax")
        self._model_labels: tuple[str, str, str, str] | None = None
        # how sure the model is (app/inference/confidence.py): every caption answered, and those under min_confidence
        self.confidence = Histogram("captioner_caption_confidence", "Confidence of the captions answered (0-1).",
                                    registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.low_confidence = Counter("captioner_low_confidence_captions", "Captions answered with confidence below "
                                      "min_confidence (flagged low_confidence).", registry=r)
        # API keys (app/api/auth.py)
        self.api_keys = Gauge("captioner_api_keys", "API keys in use (0: no keys, the API is open).", registry=r,
                              multiprocess_mode="livemax")
        self.api_key_reloads = Counter("captioner_api_keys_reloads", "Re-reads of CAPTIONER_API_KEYS_FILE after it "
                                       "changed, by result (ok: its keys are in use; error: unreadable or invalid, "
                                       "the keys in use stay).", ["result"], registry=r)
        for result in ("ok", "error"):
            self.api_key_reloads.labels(result)
        # the model repository (app/serving/registry.py): per model and version
        self.model_requests = Counter("captioner_model_requests", "Requests to the model routes by the model and "
                                      "version that answered them, route and status.",
                                      ["model", "version", "route", "status"], registry=r)
        self.model_latency = Histogram("captioner_model_request_duration_seconds", "Latency of the model routes "
                                       "by model and version.", ["model", "version", "route"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.models_loaded = Gauge("captioner_model_loaded", "1 while this model version is loaded (active or "
                                   "draining its last requests), 0 once unloaded.", ["model", "version"], registry=r,
                                   multiprocess_mode="livemax")
        self.model_loads = Counter("captioner_model_loads", "Loads and rollbacks by model and result (ok: switched; "
                                   "refused: a check failed, the old version kept serving).", ["model", "result"],
                                   registry=r)
        # request bodies (app/api/bodies.py): the bytes held in flight, and bodies refused while they stream
        self.inflight_body_bytes = Gauge("captioner_inflight_body_bytes", "Bytes of request bodies in flight "
                                         "(reserved from Content-Length, or as a chunked body streams).", registry=r,
                                         multiprocess_mode="livesum")
        self.refused_bodies = Counter("captioner_refused_bodies", "Requests refused because of their body, by reason "
                                      "(inflight_full: 503, the bytes of bodies in flight would pass "
                                      "max_inflight_body_bytes; body_timeout: 408, the body did not arrive within "
                                      "body_timeout_s).", ["reason"], registry=r)
        for reason in ("inflight_full", "body_timeout"):
            self.refused_bodies.labels(reason)
        self.rate_limited = Counter("captioner_rate_limited_requests", "Requests refused with 429 because their API "
                                    "key was over its rate limit.", registry=r)

    def set_model(self, name: str, version: str, provider: str, device: str) -> None:
        """captioner_model_info: the default model now served (value 1). The series it replaces is removed; in
        multiprocess mode it is first set to 0, as a worker's file keeps every series it ever wrote."""
        labels = (name, version, provider, device)
        if labels == self._model_labels:
            return
        if self._model_labels is not None:
            self.model.labels(*self._model_labels).set(0)
            if multiprocess_dir() is None:
                self.model.remove(*self._model_labels)
        self.model.labels(*labels).set(1)
        self._model_labels = labels

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_model_request(self, model: str, version: str, route: str, status: int, seconds: float) -> None:
        self.model_requests.labels(model, version, route, str(status)).inc()
        self.model_latency.labels(model, version, route).observe(seconds)

    def observe_batch(self, images: int, inference_s: float) -> None:
        self.images.inc(images)
        self.batch_size.observe(images)
        self.inference.observe(inference_s)

    def observe_search(self, steps: int, rows: int, dropped_rows: int, cancelled_images: int) -> None:
        self.decoder_steps.inc(steps)
        self.decoder_rows.inc(rows)
        if dropped_rows:
            self.cancelled_rows.inc(dropped_rows)
        if cancelled_images:
            self.cancelled_images.inc(cancelled_images)

    def observe_caption(self, confidence: float, low: bool) -> None:
        self.confidence.observe(confidence)
        if low:
            self.low_confidence.inc()

    def image_error(self, code: str) -> None:
        self.image_errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition: this process's registry, or with several workers every worker's values."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry), CONTENT_TYPE_LATEST
