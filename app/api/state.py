"""What the service holds while it runs: one typed `ServiceState`, built by `create_app` (app/main.py),
filled in by its lifespan, and stored once on the app as ``app.state.service``.

Everything that needs it reads it through `service_state(app)` (the routes through the dependencies
of app/api/routes/deps.py; the middleware is handed the object when `create_app` adds it), never
through FastAPI's untyped ``app.state`` itself. Per-request values (request id, start time, the
model the request picked) stay on Starlette's ``request.state``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette

from app.api.auth import APIKeys, KeyStore
from app.observability.metrics import Metrics
from app.settings import Settings

if TYPE_CHECKING:  # loading the engine (onnxruntime) waits for start-up: `import app.main` stays light
    from app.inference.engine import Engine
    from app.serving.control import WorkerControl
    from app.serving.registry import ModelRegistry, ServedModel


@dataclass(eq=False)
class ServiceState:
    """The service's settings, metrics and keys (from `create_app` on), and what start-up loads."""

    settings: Settings
    metrics: Metrics
    admin_keys: APIKeys | None = None  # the admin routes' keys (CAPTIONER_ADMIN_API_KEYS); None: routes off
    api_keys: KeyStore | None = None  # the API keys (app/api/auth.py) when configured; None: the API is open
    models: ModelRegistry | None = None  # the served models (app/serving/registry.py), once start-up loaded them
    ready: bool = False  # True between the end of start-up and the start of shutdown
    startup_error: str | None = None  # why start-up failed (the lifespan's failure message)
    inference_executor: ThreadPoolExecutor | None = None  # the one inference thread, shared by every model
    preprocess_executor: ThreadPoolExecutor | None = None  # the image-decoding pool (app/api/pipeline.py)
    control_dir: Path | None = None  # one of several workers: the supervisor's control folder (CAPTIONER_CONTROL_DIR)
    control: WorkerControl | None = None  # ...and this worker's side of it (app/serving/control.py), once started

    @property
    def default_model(self) -> ServedModel | None:
        """The default model's active version, once start-up has loaded it."""
        if self.models is None:
            return None
        return self.models.active.get(self.models.default_name)

    @property
    def engine(self) -> Engine | None:
        """The default model's engine, once start-up has loaded it."""
        default = self.default_model
        return default.engine if default is not None else None

    def find_model(self, spec: str | None) -> ServedModel | None:
        """The active model a request's ``?model=`` names (None: the default), or None: start-up has not
        loaded the models yet, or none answers to `spec` (the route then answers why)."""
        return self.models.find(spec) if self.models is not None else None


def service_state(app: Starlette) -> ServiceState:
    """The app's `ServiceState` (``app.state.service``, set by `create_app`)."""
    service: ServiceState = app.state.service
    return service
