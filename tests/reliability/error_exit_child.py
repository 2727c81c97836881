"""A failing entry point for ``test_error_exit.py``: a gloo process group (with a collective done), a DataLoader
worker, then a :class:`DataError` raised in the worker (``--where worker``) or the main process, through
:func:`run_cli` as every tool exits. ``--hang-shutdown`` makes the process-group shutdown hang."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from megatron_glm import errors
from megatron_glm.errors import DataError, run_cli
from megatron_glm.parallel.launch import start_process_group


class Failing(torch.utils.data.Dataset):
    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.fail_at:
            raise DataError(f"staged.bin: document {index} is corrupt")
        return torch.full((4,), float(index))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--where", choices=("worker", "main"), default="worker")
    parser.add_argument("--hang-shutdown", action="store_true")
    args = parser.parse_args()
    if args.hang_shutdown:
        errors.SHUTDOWN_SECONDS = 1.0
        dist.destroy_process_group = lambda *_a, **_k: time.sleep(3600)
    start_process_group(single_process_group=True)
    total = torch.ones(3)
    dist.all_reduce(total)
    loader = torch.utils.data.DataLoader(Failing(6 if args.where == "worker" else -1), batch_size=2, num_workers=1)
    for step, _batch in enumerate(loader):
        dist.all_reduce(total)
        if args.where == "main" and step == 2:
            raise DataError("staged.bin: failed in the main process")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
