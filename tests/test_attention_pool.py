"""fastattn.attention_pool on the cpu backend (and the reference's own properties) against the rule of
docs/CONTRACT.md §4."""
import pytest
import torch

import fastattn
from fastattn.testing import check_pool, pool_cases
from conftest import DTYPES, assert_all_ok, dtype_id

CASES = pool_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_matches_reference(case, dtype):
    assert_all_ok(check_pool(case, dtype, backend="cpu"), case.id)
