"""Seeded initialisation and a device-agnostic RNG tracker for tensor-parallel regions.

Initialisation draws each full (unsharded) weight from a generator seeded by (seed, parameter name), so
weights are identical for any tensor/pipeline layout and construction order; each rank keeps its shard.
Dropout inside a tensor-parallel region (attention probabilities, which are split by head) must differ
between tensor-parallel ranks; dropout on replicated activations must agree. The tracker keeps a second
RNG state for the first case and swaps it in with :meth:`RNGStatesTracker.fork`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch

InitMethod = Callable[[torch.Tensor], None]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normal_init(std: float, seed: int) -> InitMethod:
    """Fill a tensor from N(0, std) using a private generator seeded with ``seed`` (drawn in fp32)."""

    def init(t: torch.Tensor) -> None:
        if t.is_meta:
            return
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            values = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            t.copy_(values)

    return init


def blockwise_normal_init(stds: tuple[float, ...], sizes: tuple[int, ...], dim: int, seed: int) -> InitMethod:
    """Like :func:`normal_init` for a tensor packed of blocks (full ``sizes`` along ``dim``) with their own
    standard deviations: N(0, 1) drawn for the whole tensor, each block scaled by its std."""

    def init(t: torch.Tensor) -> None:
        if t.is_meta:
            return
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            values = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, 1.0, generator=gen)
            for block, std in zip(torch.split(values, list(sizes), dim=dim), stds, strict=True):
                block.mul_(std)
            t.copy_(values)

    return init


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states for the default generator of ``device`` (CPU or CUDA)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Register ``name`` with a state seeded by ``seed`` (the current state is left unchanged)."""
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state(self.device)
        # torch.manual_seed would also reseed every CUDA device; seed only this device's generator.
        torch.default_generator.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        """Run the block with the named state, then store its advanced state and restore the default."""
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} was not added")
        saved = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(self.device, saved)


MODEL_PARALLEL_RNG = "model-parallel-rng"


def model_parallel_seed(seed: int, tp_rank: int) -> int:
    """Megatron's offset for the tensor-parallel RNG stream (differs per TP rank)."""
    return seed + 2718 + tp_rank
