"""`captioner train` under torchrun: the process group, the collectives the trainer needs, and what a
failure on one rank does to the others (docs/training.md).

Run alone (no WORLD_SIZE in the environment, or WORLD_SIZE=1) nothing here starts: `Context()` is the
single process. Under `torchrun --nproc-per-node N [--nnodes M]` the torchrun environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) gives the group: NCCL when CUDA is present (each rank on
its LOCAL_RANK's GPU), Gloo on CPUs. Python objects (validation captions, decisions, the self-critical
document frequencies) travel over a Gloo group in both cases.

Every collective waits at most `--dist-timeout` seconds (init_process_group's timeout), except the wait
for the feature cache, which one rank per node computes while the others wait (FEATURE_CACHE_WAIT).
A rank that sees a collective fail (a peer exited: Gloo's connection closes at once; a peer hangs: the
timeout) raises `collective_failure_message`'s error; torchrun stops the other ranks with SIGTERM, and
each says so on stderr before it exits.

Tests only: CAPTIONER_TEST_FAIL_RANK=r makes rank r leave at its CAPTIONER_TEST_FAIL_STEP-th training
step (counted from this process's start, default 1), in torchrun's first attempt only (its restarts run
clean): CAPTIONER_TEST_FAIL_MODE=exit (default) exits with status 3, `hang` sleeps until it is killed (the
others then meet the collective timeout).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

FAIL_RANK_ENV = "CAPTIONER_TEST_FAIL_RANK"
FAIL_STEP_ENV = "CAPTIONER_TEST_FAIL_STEP"
FAIL_MODE_ENV = "CAPTIONER_TEST_FAIL_MODE"
# How long the other ranks wait while one rank per node computes the frozen encoder's feature cache
# (COCO's 123k images through onnxruntime on a CPU take hours; a failure of that rank ends the wait at once).
FEATURE_CACHE_WAIT = timedelta(hours=12)
DEFAULT_TIMEOUT_S = 600.0


def under_torchrun() -> bool:
    """Started by torchrun (its elastic agent sets these), whatever the number of ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


@dataclass
class Context:
    """Where this process stands: rank `rank` of `world_size` (1: the single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    objects: Any = None  # the Gloo group for Python objects (None: the default group, when it is Gloo)
    waiting: Any = None  # the Gloo group with FEATURE_CACHE_WAIT's timeout

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives (each a no-op for the single process) -------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64, on the CPU group)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.objects)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.objects)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def wait_for_node_leader(self) -> None:
        """A barrier with FEATURE_CACHE_WAIT's timeout (the feature cache)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=self.waiting)

    def wrap(self, module: torch.nn.Module, broadcast_buffers: bool) -> torch.nn.Module:
        """`module` under DistributedDataParallel (gradients averaged over the ranks in backward)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def from_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """The single process, or this rank of the torchrun group (joined here: NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Context(timeout_s=timeout_s)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store for all its attempts, and torch 2.13 does not separate them: a restarted
        # rank could read the address a rank of the failed attempt left there (Gloo: "connection refused"). So
        # each attempt gets keys of its own.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"/captioner/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    objects = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    waiting = dist.new_group(backend="gloo", timeout=max(FEATURE_CACHE_WAIT, timeout))
    _say_when_stopped(rank, world)
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                   timeout_s=timeout_s, objects=objects, waiting=waiting)


def _say_when_stopped(rank: int, world: int) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: say so, then go."""

    def stopped(signum, frame):  # pragma: no cover - runs in the ranks torchrun stops
        sys.stderr.write(f"error: rank {rank} of {world}: stopped by torchrun (signal {signum}) because another rank "
                         "failed or the job was cancelled; restart with --resume to continue from OUT/last.pt\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)


_COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "c10d", "peer", "socket", "broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover
        DistError = ()  # type: ignore[assignment]  # noqa: N806
    if DistError and isinstance(exc, DistError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _COLLECTIVE_WORDS)


def collective_failure_message(ctx: Context, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"rank {ctx.rank} of {ctx.world_size}: a collective operation failed ({type(exc).__name__}: {first}): "
            f"another rank exited, or did not answer within --dist-timeout {ctx.timeout_s:g} s; the job stops. "
            "Restart it with --resume to continue from the last checkpoint (OUT/last.pt)")


def failure_hook_for_tests(ctx: Context, step: int) -> None:
    """CAPTIONER_TEST_FAIL_RANK / _STEP / _MODE (tests only; module docstring)."""
    wanted = os.environ.get(FAIL_RANK_ENV)
    if wanted is None or int(wanted) != ctx.rank or step != int(os.environ.get(FAIL_STEP_ENV, "1")):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":  # torchrun's restarts run clean
        return
    mode = os.environ.get(FAIL_MODE_ENV, "exit")
    sys.stderr.write(f"{FAIL_RANK_ENV}: rank {ctx.rank} of {ctx.world_size} {'hangs' if mode == 'hang' else 'exits'} "
                     f"at its training step {step} (a test of failure handling)\n")
    sys.stderr.flush()
    if mode == "hang":
        while True:
            time.sleep(60)
    os._exit(3)


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The torch seed of rank `rank` > 0 (rank 0 keeps the single process's stream)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def shard(global_rows: int, ctx: Context) -> slice:
    """This rank's rows of a global batch: every world_size-th from its rank (DistributedSampler's interleaving)."""
    return slice(ctx.rank, global_rows, ctx.world_size)
