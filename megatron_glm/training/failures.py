"""When a rank dies, the survivors say so in one line naming the lost rank(s), instead of a gloo traceback.

A collective that fails because its peer went away raises a ``RuntimeError`` (``DistBackendError``) such
as gloo's "Connection reset by peer". :func:`lost_peer_message` recognises those, then asks the rendezvous
store which ranks are still there: every survivor writes ``megatron_glm/survivor/<rank>`` and waits a moment
for the others; the ranks that never answer are the lost ones. When the store itself is gone (it lived in
the process that died), that is said instead.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["LOST_PEER_MARKERS", "lost_contact_line", "lost_peer_message"]

#: Phrases of gloo / NCCL / TCP errors that mean "the process at the other end is gone".
LOST_PEER_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
    "remote process exited",
    "Socket Timeout",
)


def _lost_ranks(rank: int, world: int, grace_s: float) -> list[int] | None:
    """Ranks that do not report as survivors within ``grace_s`` (``None`` when the store cannot be reached)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(1.0, grace_s)))
        store.set(f"megatron_glm/survivor/{rank}", "1")
        others = [f"megatron_glm/survivor/{r}" for r in range(world) if r != rank]
        deadline = time.monotonic() + grace_s
        while True:
            missing = [int(k.rsplit("/", 1)[1]) for k in others if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # the store went down with the rank that hosted it
        return None


def lost_peer_message(exc: BaseException, grace_s: float = 3.0) -> str | None:
    """One line naming the lost rank(s) when ``exc`` says a peer process went away, else ``None``."""
    text = str(exc)
    if not isinstance(exc, RuntimeError | ConnectionError) or not any(m in text for m in LOST_PEER_MARKERS):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    lost = _lost_ranks(rank, world, grace_s)
    if lost is None:
        who = "another rank (and the rendezvous store with it, so most likely rank 0)"
    elif lost:
        who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
    else:
        who = "another rank (all answered since; a network fault?)"
    return lost_contact_line(rank, world, who)


def lost_contact_line(rank: int, world: int, who: str, how: str = "which exited or was killed") -> str:
    """The one line every survivor prints (also :mod:`megatron_glm.training.heartbeat`'s)."""
    return f"rank {rank} of {world}: lost contact with {who}, {how} (see its output); stopping this rank too"
