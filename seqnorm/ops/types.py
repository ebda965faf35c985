"""The named arguments and results of the recurrence operator, defined once.

The operator runs one direction of one layer: the input projection of every step and its
normalization, then the time loop. Its arguments travel in these named tuples; the operator's
schema (:mod:`seqnorm.ops.library`) takes their fields in the order written here, and the C++
and Triton kernels return their results in the order of :class:`LSTMSaved` / :class:`GRUSaved`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class NormConfig(NamedTuple):
    """How every normalization of a direction is configured (DESIGN.md §2)."""

    norm: str
    """``"none"``, ``"layer"``, ``"group"`` or ``"batch"``."""
    groups: int
    """Groups of ``"group"`` (1 otherwise)."""
    eps: float
    training: bool
    """Batch norm: batch statistics (True) or running ones (False)."""


class LSTMParams(NamedTuple):
    """The parameters of one direction of an LSTM layer, under torch's names where it has them."""

    w_ih: Tensor
    """``(4H, H_in)``."""
    w_hh: Tensor
    """``(4H, P)``, P = proj_size or H."""
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None
    """``(P, H)``: the projection of ``h`` (torch's ``weight_hr``), or None."""
    gamma_ih: Tensor | None
    """``(4H,)``: gain of the input projection's norm (its shift is the biases)."""
    gamma_hh: Tensor | None
    """``(4H,)``: gain of the recurrent projection's norm."""
    gamma_c: Tensor | None
    """``(H,)``: gain of the cell state's norm."""
    beta_c: Tensor | None
    """``(H,)``: shift of the cell state's norm."""


class GRUParams(NamedTuple):
    """The parameters of one direction of a GRU layer."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    gamma_ih: Tensor | None
    gamma_hh: Tensor | None


class Running(NamedTuple):
    """Batch norm's running statistics at one site of a direction (``(S, F)`` buffers)."""

    mean: Tensor
    var: Tensor
    momentum: float


class LSTMSaved(NamedTuple):
    """What an LSTM forward keeps for its backward (empty tensors without a backward).

    ``stats_*`` hold the statistics each norm used: for layer and group norm ``rstd``
    ``(T, N, G)``, for batch norm ``mean`` and ``rstd`` ``(T, 2, F)``, flattened.
    """

    hs: Tensor
    """``(T + 1, N, P)``: h before every step, and after the last."""
    cs: Tensor
    """``(T + 1, N, H)``."""
    acts: Tensor
    """``(T, N, 4H)``: sig(i), sig(f), tanh(g), sig(o) of every step."""
    xhat_hh: Tensor
    """``(T, N, 4H)``: the normalized recurrent projection."""
    stats_hh: Tensor
    xhat_c: Tensor
    """``(T, N, H)``: the normalized cell state."""
    stats_c: Tensor
    hpre: Tensor
    """``(T, N, H)``: h before the projection (with ``proj_size``)."""
    xhat_ih: Tensor
    """``(T, N, 4H)``: the normalized input projection; with ``stats_ih`` empty where the
    backward computes them again (the Triton kernels: seqnorm.ops.library.recomputes_input_xhat)."""
    stats_ih: Tensor
    counts: Tensor
    """``(T,)`` int64: the valid samples of every step."""


class GRUSaved(NamedTuple):
    """What a GRU forward keeps for its backward (see :class:`LSTMSaved`)."""

    hs: Tensor
    acts: Tensor
    """``(T, N, 3H)``: r, z, n of every step."""
    ghn: Tensor
    """``(T, N, H)``: the recurrent half of n's pre-activation, ``Nh(h W_hh^T)_n + b_hn``."""
    xhat_hh: Tensor
    stats_hh: Tensor
    xhat_ih: Tensor
    stats_ih: Tensor
    counts: Tensor
