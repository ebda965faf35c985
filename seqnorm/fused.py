"""The fused recurrence: the time loop of :class:`seqnorm.LSTM` and :class:`seqnorm.GRU` in C++.

``csrc/recurrence.cpp`` runs the recurrent half of every step (the product with ``W_hh``, its
normalization, the gates and the state update) in one C++ loop, and a hand-written backward
through time. One autograd function covers a whole direction of a layer (:func:`lstm`,
:func:`gru`): the input projection of every step at once, its normalization (layer, group or
per-step batch norm), gain and the cell's biases in one parallel C++ pass, then the time loop.
The backward hands its gradients on a chunk of steps at a time (about 512 rows), while in cache,
to the input norm's backward and to large matrix products for ``W_hh``, ``W_ih`` and the input,
so it stores no gradient of every step; and the forward's big buffers are reused in place (x_hat
over the projection, the activations over the gates): a layer-normalized LSTM's training step
allocates three buffers of every step's gates where separate functions took seven. Large float32
recurrent weights use oneDNN's packed matrix products, and without a backward no step's
activations are kept. Buffers of 1 MiB and more come from a cache of the kernel's own, which
keeps them once freed (up to :func:`set_cache_limit` bytes, 1 GiB by default) and hands them
out again for the next sequence: fresh ones would be page-faulted and cleared by the operating
system at every step, as glibc returns buffers over 32 MB to it on free (:func:`cache_info`,
:func:`empty_cache`). It is compiled with ``torch.utils.cpp_extension`` the first time it is
needed (about 20 seconds, then cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). In float32 its sigmoid and tanh are polynomial forms accurate
to a few units in the last place.

The layers use it for float32 and float64 on CPU outside autocast and ``torch.compile``, and
fall back to the readable per-step Python loop (the reference the tests check this against)
everywhere else: on CUDA, under autocast, when compiling, for synchronized batch norm, when
``SEQNORM_FUSED=0`` is set, and when no C++ compiler is available (with one warning saying why).
It supports first derivatives only.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .functional import _update_running
from .norms import RecurrentBatchNorm

_NONE, _GROUP, _BATCH = 0, 1, 2
_loaded: bool | None = None


def available() -> bool:
    """Whether the fused kernel can run here, compiling it on the first call."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get("SEQNORM_FUSED", "1") == "0":
            return False
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("csrc") / "recurrence.cpp"
            flags = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
            if platform.machine().lower() in ("x86_64", "amd64"):
                # GCC tunes some AMD virtual CPUs as Zen 1 and then vectorizes 4 floats wide;
                # 8 wide (AVX2) is a few percent faster on the benchmark machine.
                flags.append("-mprefer-vector-width=256")
            load(
                "seqnorm_fused",
                [str(source)],
                extra_cflags=flags,
                extra_ldflags=["-lgomp"],  # the libgomp.so.1 torch itself loads
                is_python_module=False,
            )
            _loaded = True
        except Exception as error:  # no compiler, no ninja, no headers: the Python loop still works
            warnings.warn(
                f"seqnorm could not build its fused C++ recurrence ({type(error).__name__}: "
                f"{error}); LSTM and GRU run the slower per-step Python loop instead",
                stacklevel=3,
            )
    return _loaded


def cache_info() -> dict[str, int]:
    """The kernel's buffer cache: bytes ``cached`` (freed, kept for reuse), ``in_use`` and the
    ``limit`` on cached bytes (all 0 where the kernel cannot be built)."""
    if not available():
        return {"cached": 0, "in_use": 0, "limit": 0}
    cached, in_use, limit = torch.ops.seqnorm_fused.cache_info()
    return {"cached": cached, "in_use": in_use, "limit": limit}


def set_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed step buffers for reuse (default 1 GiB; 0 caches none and
    releases what is kept)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r}: expected a whole number of bytes >= 0")
    if available():
        torch.ops.seqnorm_fused.set_cache_limit(nbytes)


def empty_cache() -> None:
    """Release the freed step buffers the kernel keeps for reuse (those in use stay)."""
    if available():
        torch.ops.seqnorm_fused.empty_cache()


def applies(x: Tensor, *tensors: Tensor | None, norms: tuple[nn.Module | None, ...]) -> bool:
    """Whether the fused kernel computes what the Python loop would (to rounding) for these."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    params = [p for n in norms if n is not None for p in n.parameters()]
    if any(t is not None and t.dtype != x.dtype for t in (*tensors, *params)):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if any(isinstance(n, RecurrentBatchNorm) and n._synced() for n in norms):
        return False
    return available()


def lstm(
    x: Tensor,
    weight_ih: Tensor,
    bias: Tensor | None,
    norm_ih: nn.Module | None,
    state: tuple[Tensor, Tensor],
    weight_hh: Tensor,
    norm_hh: nn.Module | None,
    norm_c: nn.Module | None,
    mask: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One direction of an LSTM layer, as :func:`seqnorm.functional.lstm_input` and a loop of
    ``lstm_step`` compute it: ``x`` ``(T, N, H_in)``, ``bias`` the sum ``b_ih + b_hh`` (or
    ``None``), ``state`` ``(h_0, c_0)`` each ``(N, H)``. Returns the ``(T, N, H)`` outputs and
    ``(h, c)``."""
    spec_ih = _Spec(norm_ih, None, x.shape[0], mask)
    spec = _Spec(norm_hh, norm_c, x.shape[0], mask)
    gamma_hh = None if norm_hh is None else norm_hh.weight
    gamma_c, beta_c = (None, None) if norm_c is None else (norm_c.weight, norm_c.bias)
    h0, c0 = state
    out, h, c = _LSTM.apply(
        x,
        weight_ih,
        *_input_affine(norm_ih, bias),
        h0,
        c0,
        weight_hh,
        gamma_hh,
        gamma_c,
        beta_c,
        spec_ih,
        spec,
    )
    return out, (h, c)


def gru(
    x: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor | None,
    norm_ih: nn.Module | None,
    h0: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    norm_hh: nn.Module | None,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One direction of a GRU layer, as :func:`seqnorm.functional.gru_input` and a loop of
    ``gru_step`` compute it: ``x`` ``(T, N, H_in)``, ``h0`` ``(N, H)``. Returns the
    ``(T, N, H)`` outputs and ``h``."""
    spec_ih = _Spec(norm_ih, None, x.shape[0], mask)
    spec = _Spec(norm_hh, None, x.shape[0], mask)
    gamma_hh = None if norm_hh is None else norm_hh.weight
    return _GRU.apply(
        x,
        weight_ih,
        *_input_affine(norm_ih, bias_ih),
        h0,
        weight_hh,
        bias_hh,
        gamma_hh,
        spec_ih,
        spec,
    )


def _input_affine(norm: nn.Module | None, bias: Tensor | None) -> tuple[Tensor | None, ...]:
    """The gain of the input half's norm and what is added after it: its bias and the cell's."""
    if norm is None:
        return None, bias
    if norm.bias is not None:
        bias = norm.bias if bias is None else norm.bias + bias
    return norm.weight, bias


class _Spec:
    """The kernel's view of the per-step norms of one direction: kind, groups, eps, training,
    the mask and, for batch norm, the running statistics of steps ``0..T-1``."""

    def __init__(self, norm: nn.Module | None, norm_c: nn.Module | None, steps: int, mask):
        self.norms = [n for n in (norm, norm_c) if n is not None]
        self.mask = None if mask is None else mask.contiguous()
        self.kind = (
            _NONE if norm is None else _BATCH if isinstance(norm, RecurrentBatchNorm) else _GROUP
        )
        self.groups = norm.num_groups if self.kind == _GROUP else 1
        self.eps = norm.eps if norm is not None else 1e-5
        self.training = norm is not None and norm.training
        # Whether a backward can follow: inside Function.forward grad mode is always off, and
        # needs_input_grad says True for parameters even under torch.no_grad().
        self.grad_enabled = torch.is_grad_enabled()
        self.running = [None] * 4
        if self.kind == _BATCH:
            self.slot = torch.arange(steps).clamp_(max=norm.max_steps - 1)
            self.running = [
                s for n in self.norms for s in (n.running_mean[self.slot], n.running_var[self.slot])
            ]
            self.running += [None] * (4 - len(self.running))

    def args(self):
        return self.mask, self.kind, self.groups, self.eps, self.training

    def update_running(self, bstats: list[Tensor], counts: Tensor) -> None:
        """Move the running statistics as the per-step Python loop would (one update per step)."""
        if self.kind != _BATCH or not self.training:
            return
        count = counts.to(bstats[0].dtype).unsqueeze(1)  # (T, 1)
        use = count >= 2
        for norm, (mean, var) in zip(self.norms, bstats):
            unbiased = var * count / (count - 1).clamp(min=1)
            _update_running(norm.running_mean, mean, use, self.slot, norm.momentum)
            _update_running(norm.running_var, unbiased, use, self.slot, norm.momentum)


def _grads(ctx, *grads):
    """Return only the gradients autograd asked for (None for inputs that need none)."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _input_forward(x, w_ih, gamma, beta, spec: _Spec, keep: bool):
    """The input half of the gates for every step at once, ``Nx(x W_ih^T) + beta`` (without a
    norm ``x W_ih^T + beta``): a new tensor from the kernel's buffer cache, which the recurrence
    then overwrites with its activations; the norm's pass writes x_hat over the projection.
    Returns the gates, x_hat and the norm's statistics (``None`` without a norm)."""
    if spec.kind == _NONE:
        return torch.ops.seqnorm_fused.project(x, w_ih, beta), None, None
    gx, xhat, stats, bstats, counts = torch.ops.seqnorm_fused.input_norm_forward(
        torch.ops.seqnorm_fused.project(x, w_ih, None),
        *spec.args(),
        gamma,
        beta,
        *spec.running[:2],
        keep,
    )
    spec.update_running([bstats], counts)
    return gx, xhat, stats


def _input_backward_args(ctx, x, w_ih, gamma, xhat, stats) -> tuple:
    """What the recurrence's backward needs to compute the input half's gradients as it goes:
    the layer input, ``W_ih``, the norm, its gain, x_hat and statistics, and which of the
    gradients of ``x``, ``W_ih``, the gain and the added bias autograd asks for."""
    spec = ctx.spec_ih
    needs = list(ctx.needs_input_grad[:4])
    return x, w_ih, spec.kind, spec.groups, spec.eps, spec.training, gamma, xhat, stats, needs


class _LSTM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        w_ih,
        gamma_ih,
        beta_ih,
        h0,
        c0,
        w_hh,
        gamma_hh,
        gamma_c,
        beta_c,
        spec_ih: _Spec,
        spec: _Spec,
    ):
        keep = spec.grad_enabled and any(ctx.needs_input_grad)  # else keep no step's activations
        gx, xhat_ih, stats_ih = _input_forward(x, w_ih, gamma_ih, beta_ih, spec_ih, keep)
        out, h, c, *saved, bstats_hh, bstats_c, counts = torch.ops.seqnorm_fused.lstm_forward(
            gx, h0, c0, w_hh, *spec.args(), gamma_hh, gamma_c, beta_c, *spec.running, keep
        )
        spec.update_running([bstats_hh, bstats_c], counts)
        ctx.spec, ctx.spec_ih = spec, spec_ih
        if keep:
            ctx.save_for_backward(
                x,
                w_ih,
                gamma_ih,
                xhat_ih,
                stats_ih,
                w_hh,
                gamma_hh,
                gamma_c,
                beta_c,
                *saved,
                counts,
            )
        return out, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_h, grad_c):
        x, w_ih, gamma_ih, xhat_ih, stats_ih, w_hh, gamma_hh, gamma_c, beta_c, *saved = (
            ctx.saved_tensors
        )
        grads = torch.ops.seqnorm_fused.lstm_backward(
            grad_out,
            grad_h,
            grad_c,
            w_hh,
            *ctx.spec.args(),
            gamma_hh,
            gamma_c,
            beta_c,
            *saved,
            *_input_backward_args(ctx, x, w_ih, gamma_ih, xhat_ih, stats_ih),
        )
        return _grads(ctx, *grads, None, None)


class _GRU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, w_ih, gamma_ih, beta_ih, h0, w_hh, bias_hh, gamma_hh, spec_ih: _Spec, spec: _Spec
    ):
        keep = spec.grad_enabled and any(ctx.needs_input_grad)
        gx, xhat_ih, stats_ih = _input_forward(x, w_ih, gamma_ih, beta_ih, spec_ih, keep)
        out, h, *saved, bstats, counts = torch.ops.seqnorm_fused.gru_forward(
            gx, h0, w_hh, bias_hh, *spec.args(), gamma_hh, *spec.running[:2], keep
        )
        spec.update_running([bstats], counts)
        ctx.spec, ctx.spec_ih = spec, spec_ih
        ctx.has_bias = bias_hh is not None
        if keep:
            ctx.save_for_backward(
                x, w_ih, gamma_ih, xhat_ih, stats_ih, w_hh, gamma_hh, *saved, counts
            )
        return out, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_h):
        x, w_ih, gamma_ih, xhat_ih, stats_ih, w_hh, gamma_hh, *saved = ctx.saved_tensors
        grads = torch.ops.seqnorm_fused.gru_backward(
            grad_out,
            grad_h,
            w_hh,
            ctx.has_bias,
            *ctx.spec.args(),
            gamma_hh,
            *saved,
            *_input_backward_args(ctx, x, w_ih, gamma_ih, xhat_ih, stats_ih),
        )
        return _grads(ctx, *grads, None, None)
