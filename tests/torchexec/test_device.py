"""torchexec.device.torch_device: a user's --device either names a device this machine has or fails in one line
(InputError) before any work; CUDA's presence is simulated so that every branch runs on a CPU-only host."""
from __future__ import annotations

import pytest
import torch

from carsam_onnx.errors import InputError
from carsam_onnx.torchexec.device import torch_device


def test_cpu_and_default():
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(None) == torch.device("cpu")


@pytest.mark.parametrize("name, words", [("gpu", "not a device"), ("cuda:x", "not a device"),
                                         ("mps", "cpu or cuda"), ("meta", "cpu or cuda")])
def test_names_that_are_not_a_device_here(name, words):
    with pytest.raises(InputError, match=words):
        torch_device(name)


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="torch sees no CUDA device; use --device cpu"):
        torch_device("cuda")
    with pytest.raises(InputError, match="or --runtime ort"):
        torch_device("cuda:0", hint="use --device cpu or --runtime ort")


def test_cuda_index_past_the_last(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda:1") == torch.device("cuda:1")
    assert torch_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError, match=r"torch sees 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        torch_device("cuda:2")
