import pytest
import torch

from fastattn.testing import DTYPE_NAMES

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def dtype_id(d):
    return DTYPE_NAMES[d]


def assert_all_ok(comparisons, label):
    bad = [f"{c.name}: err {c.err:.3g} > allowed {c.allowed:.3g} (reference's own err {c.ref_err:.3g})"
           for c in comparisons if not c.ok]
    assert not bad, f"{label}: " + "; ".join(bad)


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield
