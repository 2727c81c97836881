"""Run a function on N CPU processes with gloo: free port, clean shutdown, child tracebacks reported.

``fn(rank, world_size, *args)`` must be importable (module level). Whatever it returns is saved with
``torch.save`` and handed back to the caller, one value per rank (tensors, lists, dicts, numbers).

The ranks are forked from a fork server that has imported torch once (``forkserver`` with torch preloaded),
not started fresh (``spawn``): a spawned rank spends seconds importing torch, and the test suite starts ranks
some hundred times. Like a spawned one, a rank starts from a clean interpreter state (the server never runs
anything), the caller's ``sys.path`` and working directory, and the caller's environment of the moment of the
call applied when it starts (what is read at process start, e.g. glibc's ``MALLOC_*`` variables, is the fork
server's: pass ``start_method="spawn"`` for that).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_glm.parallel.launch import find_free_port

#: what the fork server imports once, so that every rank forked from it starts with torch ready
_PRELOAD = ("torch", "torch.distributed", "megatron_glm.testing.distributed")


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, environ: dict, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.clear()  # the caller's environment, not the fork server's (that of its own start)
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while a peer is still inside a collective
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, start_method: str = "forkserver"
) -> list[Any]:
    """Run ``fn`` on ``world_size`` gloo processes and return each rank's result (rank order).

    Raises ``RuntimeError`` with the failing rank's traceback, or on timeout (all children are killed).
    """
    multiprocessing.set_forkserver_preload(list(_PRELOAD))  # takes effect when the server starts (first use)
    with tempfile.TemporaryDirectory(prefix="glm-dist-") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, find_free_port(), out_dir, dict(os.environ), fn, args),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{getattr(fn, '__name__', fn)} on {world_size} ranks timed out after {timeout:.0f} s"
                    )
        except mp.ProcessRaisedException as exc:
            errors = sorted(Path(out_dir).glob("rank*.err"))
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors) or str(exc)
            raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on {world_size} ranks:\n{detail}") from None
        except mp.ProcessExitedException as exc:
            raise RuntimeError(f"{getattr(fn, '__name__', fn)}: a rank exited abnormally: {exc}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
