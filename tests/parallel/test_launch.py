"""The device of a rank: ``cuda:LOCAL_RANK`` (as DeepSpeed and its pipeline engine take it), never wrapped."""

from __future__ import annotations

from unittest import mock

import pytest

from megatron_glm.errors import ConfigError
from megatron_glm.parallel.launch import cuda_device_index, start_process_group


def test_device_is_the_local_rank() -> None:
    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))


def test_more_ranks_than_devices_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError) as err:
        cuda_device_index(2, 2)  # the old choice, 2 % 2, put rank 2 on DeepSpeed's cuda:0 and PipelineModule's cuda:2
    assert str(err.value) == (
        "LOCAL_RANK 2 has no GPU: 2 visible (CUDA_VISIBLE_DEVICES=0,1); start one process per GPU "
        "(e.g. torchrun --nproc-per-node 2)"
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK 1 has no GPU: 1 visible; start one process per GPU"):
        cuda_device_index(1, 1)


def test_start_process_group_refuses_before_touching_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=2),
        mock.patch("torch.cuda.set_device") as set_device,
        pytest.raises(ConfigError, match="LOCAL_RANK 3 has no GPU: 2 visible"),
    ):
        start_process_group()
    set_device.assert_not_called()
