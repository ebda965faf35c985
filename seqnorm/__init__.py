"""seqnorm: layer-, group- and batch-normalized LSTM and GRU, drop-in for torch.nn.

``import seqnorm`` needs torch only; the Lightning training layer lives in ``seqnorm.lightning``.
"""

from . import functional, norms
from .cells import GRUCell, LSTMCell
from .norms import NORMS
from .rnn import GRU, LSTM

__all__ = ["GRU", "LSTM", "NORMS", "GRUCell", "LSTMCell", "functional", "norms"]
__version__ = "0.1.0"
