"""Health check of the captioner containers: exit 0 when GET /readyz answers 200.

/readyz answers 200 once the model bundle is loaded and the engine warmed up, so the container
turns healthy only when it can caption. Standard library only (the images have no curl); proxies
from the environment are ignored, the request goes straight to the service in this container.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("CAPTIONER_PORT", "8000").strip() or "8000"
    url = f"http://127.0.0.1:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            if response.status == 200:
                return 0
            print(f"{url}: HTTP {response.status}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - not listening yet, 503 while loading, timeout: all mean "not ready"
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
