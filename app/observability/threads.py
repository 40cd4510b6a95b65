"""OS-visible names for the service's own threads, so `top -H`, `ps -L`, py-spy and /proc/<pid>/task/*/comm
tell the event loop (the process's name), the image-decoding pool (`captioner-prep`) and the inference thread
(`captioner-infer`) apart; bench/frontend.py reads each one's CPU time this way. Python 3.11 names threads for
Python only (threading.Thread.name); Linux takes a name of at most 15 bytes through prctl(PR_SET_NAME)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

PREPROCESS_THREAD = "captioner-prep"
INFERENCE_THREAD = "captioner-infer"
_PR_SET_NAME = 15


def os_thread_namer(name: str) -> Callable[[], None]:
    """An executor `initializer` naming each of its threads `name` for the OS (a no-op off Linux)."""
    encoded = name.encode()[:15]

    def initializer() -> None:
        if not sys.platform.startswith("linux"):
            return
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the thread keeps the process's name
            pass

    return initializer
