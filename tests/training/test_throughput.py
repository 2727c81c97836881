"""The MFU peak: the datasheet table by device name, the --logging.peak_tflops override, the measured fallback."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from megatron_glm.training.throughput import device_peak_flops, matmul_peak_flops, table_peak_flops


@pytest.mark.parametrize(
    ("name", "bf16", "fp32"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4, 66.9),  # SXM
        ("NVIDIA H100 PCIe", 756.5, 51.2),
        ("NVIDIA H100 NVL", 835.5, 60.0),
        ("NVIDIA H200", 989.4, 66.9),
        ("NVIDIA GH200 480GB", 989.4, 66.9),
        ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
        ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
        ("NVIDIA L40S", 362.05, 91.6),
        ("NVIDIA L40", 181.05, 90.5),
        ("NVIDIA L4", 121.0, 30.3),
        ("NVIDIA A10", 125.0, 31.2),
        ("Tesla V100-SXM2-32GB", 125.0, 15.7),
        ("Tesla V100-PCIE-16GB", 112.0, 14.0),
    ],
)
def test_table_by_device_name(name: str, bf16: float, fp32: float) -> None:
    assert table_peak_flops(name, torch.bfloat16) == pytest.approx(bf16 * 1e12)
    assert table_peak_flops(name, torch.float16) == pytest.approx(bf16 * 1e12)
    assert table_peak_flops(name, torch.float32) == pytest.approx(fp32 * 1e12)


def test_unknown_devices_are_not_guessed() -> None:
    for name in ("NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla V100S-PCIE-32GB", "cpu"):
        assert table_peak_flops(name, torch.bfloat16) is None, name
    assert table_peak_flops("NVIDIA B200", torch.float32) is None  # its fp32 rate: not in the table


def test_device_peak_override_table_and_measured() -> None:
    cuda = torch.device("cuda", 0)
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3"):
        assert device_peak_flops(torch.bfloat16, cuda) == (989.4e12, "datasheet of the NVIDIA H100 80GB HBM3")
        assert device_peak_flops(torch.bfloat16, cuda, 500.0) == (500e12, "--logging.peak_tflops")
    with (
        mock.patch("torch.cuda.get_device_name", return_value="NVIDIA Future GPU"),
        mock.patch("megatron_glm.training.throughput.matmul_peak_flops", return_value=7e14) as measure,
    ):
        assert device_peak_flops(torch.bfloat16, cuda) == (7e14, "a matmul measured on the NVIDIA Future GPU")
    assert measure.call_args.kwargs["n"] == 8192  # a matmul large enough for a GPU
    peak, source = device_peak_flops(torch.float32, torch.device("cpu"))
    assert 1e8 < peak < 1e14 and source == "a matmul measured on the cpu"


def test_measured_matmul_times_batches_with_one_synchronise() -> None:
    """On CUDA the matmuls of a batch are timed together: one synchronise per ``calls`` matmuls."""
    syncs, matmuls = [], []
    real = torch.matmul

    def counting_matmul(*args, **kwargs):
        matmuls.append(1)
        return real(*args, **kwargs)

    device = mock.MagicMock(type="cuda")
    with (
        mock.patch("torch.device", return_value=device),
        mock.patch("torch.randn", side_effect=lambda *s, **k: torch.ones(*s)),
        mock.patch("torch.empty", side_effect=lambda *s, **k: torch.zeros(*s)),
        mock.patch("torch.cuda.synchronize", side_effect=lambda *_: syncs.append(1)),
        mock.patch("torch.matmul", side_effect=counting_matmul),
    ):
        peak = matmul_peak_flops(torch.float32, "cuda", n=64, seconds=0.05)
    assert peak > 0 and len(matmuls) >= 2 * 20 and len(matmuls) % 20 == 0
    assert len(syncs) == 2 * len(matmuls) // 20  # before and after each batch of 20, none per matmul
