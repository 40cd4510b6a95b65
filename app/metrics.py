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
                                "(queue_full, deadline, client_gone).", ["reason"], registry=r)
        self.queue = Histogram("captioner_queue_seconds", "Time a request waited in the batcher's queue.",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.inference = Histogram("captioner_inference_seconds", "Engine time per call (encoder + search).",
                                   registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.image_errors = Counter("captioner_image_errors", "Uploads that could not be used, by error code.",
                                    ["code"], registry=r)
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warmed up.", registry=r)
        self.model = Info("captioner_model", "The model bundle served and the execution provider.", registry=r)
        # how sure the model is (app/confidence.py): every caption answered, and those under min_confidence
        self.confidence = Histogram("captioner_caption_confidence", "Confidence of the captions answered (0-1).",
                                    registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.low_confidence = Counter("captioner_low_confidence_captions", "Captions answered with confidence below "
                                      "min_confidence (flagged low_confidence).", registry=r)
        # API keys (app/auth.py)
        self.api_keys = Gauge("captioner_api_keys", "API keys in use (0: no keys, the API is open).", registry=r)
        self.api_key_reloads = Counter("captioner_api_keys_reloads", "Re-reads of CAPTIONER_API_KEYS_FILE after it "
                                       "changed, by result (ok: its keys are in use; error: unreadable or invalid, "
                                       "the keys in use stay).", ["result"], registry=r)
        for result in ("ok", "error"):
            self.api_key_reloads.labels(result)
        self.rate_limited = Counter("captioner_rate_limited_requests", "Requests refused with 429 because their API "
                                    "key was over its rate limit.", registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, images: int, inference_s: float) -> None:
        self.images.inc(images)
        self.batch_size.observe(images)
        self.inference.observe(inference_s)

    def observe_caption(self, confidence: float, low: bool) -> None:
        self.confidence.observe(confidence)
        if low:
            self.low_confidence.inc()

    def image_error(self, code: str) -> None:
        self.image_errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
