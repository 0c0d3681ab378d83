"""xbit.dispatch: the kernel is chosen once per layer and kind of input, not on every forward."""

import torch

from xbit import dispatch
from xbit.modules import XbitLinear
from xbit.rtn import quantize_weight_rtn


def _layer():
    k = 64
    t = quantize_weight_rtn(torch.randn(16, k), torch.full((k,), 4, dtype=torch.uint8), torch.arange(k), 32)
    return XbitLinear.from_tensors(t, None, 32)


def test_kernel_chosen_once_per_layer_and_input_kind(monkeypatch):
    asked = []

    class Counting(dispatch.ReferenceKernel):
        name = "counting"

        @staticmethod
        def can_run(layer, x):
            asked.append(x.dtype)
            return True, ""

    monkeypatch.setattr(dispatch, "KERNELS", [Counting])
    layer, x = _layer(), torch.randn(3, 64)
    for _ in range(3):
        y = layer(x)
    assert asked == [torch.float32]
    torch.testing.assert_close(y, dispatch.ReferenceKernel.run(x, layer))
    layer(x.bfloat16())  # another dtype: chosen again, once
    layer(x.bfloat16())
    assert asked == [torch.float32, torch.bfloat16]
    dispatch.reset(layer)
    layer(x)
    assert len(asked) == 3


def test_replacing_the_kernel_list_takes_effect(monkeypatch):
    layer, x = _layer(), torch.randn(2, 64)
    layer(x)  # whichever kernel this machine has
    monkeypatch.setattr(dispatch, "KERNELS", [dispatch.ReferenceKernel])
    assert dispatch.chosen(layer, x) is dispatch.ReferenceKernel
