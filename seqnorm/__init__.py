"""seqnorm: layer-, group- and batch-normalized LSTM and GRU, drop-in for torch.nn.

``import seqnorm`` needs torch only; the Lightning training layer lives in ``seqnorm.lightning``.
"""

from . import functional, norms, ops
from .cells import GRUCell, LSTMCell
from .checks import NORMS, ShapeError
from .norms import update_bn
from .rnn import GRU, LSTM

SAFE_GLOBALS = [
    LSTM,
    GRU,
    LSTMCell,
    GRUCell,
    norms.RecurrentGroupNorm,
    norms.RecurrentBatchNorm,
    norms.GroupNorm,
    norms.LayerNorm,
    norms.InstanceNorm,
    norms.BatchNorm,
]
"""Every class a pickled seqnorm model references, for ``torch.load(..., weights_only=True)``:
``with torch.serialization.safe_globals(seqnorm.SAFE_GLOBALS): model = torch.load(path)``."""

__all__ = [
    "GRU",
    "LSTM",
    "NORMS",
    "SAFE_GLOBALS",
    "GRUCell",
    "LSTMCell",
    "ShapeError",
    "functional",
    "norms",
    "ops",
    "update_bn",
]
__version__ = "0.1.0"
