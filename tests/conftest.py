import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before Triton is first imported (seqnorm imports it lazily, so here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The C++ kernel times oneDNN's packed product against at::mm per shape and keeps the faster;
# the tests ask for the packed one, so that its path is tested on every machine (a test covers
# the timing itself).
os.environ.setdefault("SEQNORM_CPU_PRODUCT", "packed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_collection_modifyitems(items):
    """Every case on the Triton backend is slow without a GPU (Triton's interpreter runs each
    program in Python): ``-m "not slow"`` leaves them to the full run."""
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and "triton" in params.params.values():
            item.add_marker(pytest.mark.slow)
