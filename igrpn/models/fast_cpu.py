"""The CPU inference fast path of every model's convolutions.

At inference (eval mode, autograd off, CPU float32) PyTorch's backend heuristic sends most batch-1
3D convolutions to the slow im2col path, runs BatchNorm and ReLU as separate passes over every
activation, and reorders activations to oneDNN's blocked layout and back around every convolution.
The fast path folds BatchNorm into the convolution's weights, runs each convolution with its ReLU as
one oneDNN call on weights pre-packed for the input shape, and keeps activations channels-last. Its
outputs equal the plain path's up to float rounding; training is untouched. ``IGRPN_FAST_INFERENCE=0``
turns it off (the measurements behind it: benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


#: The fast path is on unless the environment sets IGRPN_FAST_INFERENCE=0 (see :func:`fast_inference`).
_FAST_INFERENCE = os.environ.get("IGRPN_FAST_INFERENCE", "1") != "0"
#: Whether oneDNN's fused convolution op works in this PyTorch build (None: not tried yet).
_ONEDNN_FUSED_OK: bool | None = None


@contextlib.contextmanager
def fast_inference(enabled: bool = True):
    """Switch the CPU inference fast path on or off inside a ``with`` block (benchmarks, tests).

    The fast path only ever applies in eval mode with autograd off (``torch.no_grad`` or
    ``torch.inference_mode``) to CPU float32 tensors; it gives the plain path's outputs up to float
    rounding (relative differences around 1e-6)."""
    global _FAST_INFERENCE
    previous, _FAST_INFERENCE = _FAST_INFERENCE, bool(enabled)
    try:
        yield
    finally:
        _FAST_INFERENCE = previous


def fast_path_applies(module: nn.Module, x: Tensor) -> bool:
    """True when ``module`` may run its inference fast path on ``x`` (N, C, X, Y, Z): the fast
    path is switched on, ``module`` is in eval mode, autograd is off, ``x`` is CPU float32."""
    return (_FAST_INFERENCE and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 5)


def _tensor_state(*tensors) -> tuple:
    """Identity and in-place version of each tensor: changes when a weight is replaced (``.to``,
    a new Parameter) or updated in place (optimiser step, ``load_state_dict``)."""
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


class _FoldedConv3d:
    """An inference-time copy of a Conv3d with an optional eval-mode BatchNorm3d folded into its
    weight and bias: ``bn(conv(x)) = conv'(x)`` with ``w' = w·γ/√(σ²+ε)`` per output channel and
    ``b' = (b − µ)·γ/√(σ²+ε) + β``. ``__call__`` runs it (with an optional fused ReLU) through
    oneDNN on channels-last activations, with the weight re-packed once per input shape."""

    def __init__(self, conv: nn.Conv3d, bn: nn.BatchNorm3d | None):
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        if bn is not None:
            scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            bias = (bias - bn.running_mean.detach()) * scale
            if bn.bias is not None:
                bias = bias + bn.bias.detach()
            weight = weight * scale[:, None, None, None, None]
        self.weight, self.bias = weight.contiguous(), bias.contiguous()
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._packed: dict[tuple, Tensor] = {}  # input shape -> oneDNN-packed weight

    def __call__(self, x: Tensor, relu: bool) -> Tensor:
        """x: (N, Cin, X, Y, Z) float32 CPU -> (N, Cout, X', Y', Z') channels-last."""
        global _ONEDNN_FUSED_OK
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if _ONEDNN_FUSED_OK is not False:
            try:
                out = self._onednn(x, relu)
                _ONEDNN_FUSED_OK = True
                return out
            except (AttributeError, RuntimeError, TypeError):
                if _ONEDNN_FUSED_OK:  # it worked before: a genuine error, not a missing op
                    raise
                _ONEDNN_FUSED_OK = False  # this build has no usable oneDNN op: plain conv below
        out = F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out.relu_() if relu else out

    def _onednn(self, x: Tensor, relu: bool) -> Tensor:
        shape = tuple(x.shape)
        if shape not in self._packed:
            self._packed[shape] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, self.dilation, self.groups, list(shape)
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed[shape], self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if relu else "none", [None] if relu else [], "",
        )


def folded_conv(owner: nn.Module, slot: str, conv: nn.Conv3d, bn: nn.BatchNorm3d | None = None) -> _FoldedConv3d:
    """The cached :class:`_FoldedConv3d` of ``conv`` (+ ``bn``), kept on ``owner`` under ``slot``
    (outside the state dict) and rebuilt whenever one of the weights or statistics changed."""
    tensors = (conv.weight, conv.bias)
    if bn is not None:
        tensors += (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state = _tensor_state(*tensors)
    cache = owner.__dict__.setdefault("_folded_convs", {})
    if slot not in cache or cache[slot][0] != state:
        cache[slot] = (state, _FoldedConv3d(conv, bn))
    return cache[slot][1]


def fast_conv3d(owner: nn.Module, slot: str, conv: nn.Conv3d, x: Tensor, relu: bool = False) -> Tensor:
    """``conv(x)`` (then ReLU when ``relu``): one oneDNN call on channels-last activations on the
    inference fast path (cached on ``owner`` under ``slot``), else the plain ops."""
    if fast_path_applies(owner, x) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return folded_conv(owner, slot, conv)(x, relu=relu)
    return F.relu(conv(x)) if relu else conv(x)


def conv3d_relu(owner: nn.Module, slot: str, conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``relu(conv(x))`` through :func:`fast_conv3d`."""
    return fast_conv3d(owner, slot, conv, x, relu=True)


def single_threaded(function):
    """Decorator: run ``function`` with one intra-op thread (``torch.set_num_threads``, restored
    afterwards). For post-processing: it is hundreds of small operations, each a parallel region
    whose two threads must meet; on a 2-core machine shared with other busy processes one of them
    is often descheduled, and every region then waits a time slice (measurements:
    benchmarks/NOTES.md).
    The thread count is process-wide: another Python thread running torch meanwhile gets one too."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        if previous == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper
