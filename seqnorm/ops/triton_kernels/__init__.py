"""The recurrence on CUDA: Triton kernels (recurrence.py drives them; norms.py, lstm.py and gru.py
hold them; graphs.py captures the time loops in CUDA graphs).

The same kernels run on CPU tensors in Triton's interpreter, which is how they are tested without
a GPU: set ``TRITON_INTERPRET=1`` before Triton is first imported. Importing this package needs
``triton`` (CUDA builds of torch bring it).
"""

from .graphs import clear as clear_graphs
from .recurrence import (
    MAX_BATCH_NORM_BATCH,
    MAX_GROUPS,
    MAX_HIDDEN,
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    unsupported,
)

__all__ = [
    "MAX_BATCH_NORM_BATCH",
    "MAX_GROUPS",
    "MAX_HIDDEN",
    "clear_graphs",
    "gru_backward",
    "gru_forward",
    "lstm_backward",
    "lstm_forward",
    "unsupported",
]
