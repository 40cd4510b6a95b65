"""The service's Prometheus metrics (served at `/metrics`, README: Observability)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

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
                                  registry=r)
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
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warmed up.", registry=r)
        self.model = Info("captioner_model", "The model bundle served and the execution provider.", registry=r)
        # how sure the model is (app/inference/confidence.py): every caption answered, and those under min_confidence
        self.confidence = Histogram("captioner_caption_confidence", "Confidence of the captions answered (0-1).",
                                    registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.low_confidence = Counter("captioner_low_confidence_captions", "Captions answered with confidence below "
                                      "min_confidence (flagged low_confidence).", registry=r)
        # API keys (app/api/auth.py)
        self.api_keys = Gauge("captioner_api_keys", "API keys in use (0: no keys, the API is open).", registry=r)
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
                                   "draining its last requests), 0 once unloaded.", ["model", "version"], registry=r)
        self.model_loads = Counter("captioner_model_loads", "Loads and rollbacks by model and result (ok: switched; "
                                   "refused: a check failed, the old version kept serving).", ["model", "result"],
                                   registry=r)
        # request bodies (app/api/bodies.py): the bytes held in flight, and bodies refused while they stream
        self.inflight_body_bytes = Gauge("captioner_inflight_body_bytes", "Bytes of request bodies in flight "
                                         "(reserved from Content-Length, or as a chunked body streams).", registry=r)
        self.refused_bodies = Counter("captioner_refused_bodies", "Requests refused because of their body, by reason "
                                      "(inflight_full: 503, the bytes of bodies in flight would pass "
                                      "max_inflight_body_bytes; body_timeout: 408, the body did not arrive within "
                                      "body_timeout_s).", ["reason"], registry=r)
        for reason in ("inflight_full", "body_timeout"):
            self.refused_bodies.labels(reason)
        self.rate_limited = Counter("captioner_rate_limited_requests", "Requests refused with 429 because their API "
                                    "key was over its rate limit.", registry=r)

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
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
