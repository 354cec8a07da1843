"""Assertion helpers shared by the test files, with one definition of relative error.

Relative error, everywhere in these tests: ``max |actual - expected| / max |expected|``, the largest absolute
difference over the largest absolute value of the expected tensor (one scale for the whole tensor, not an
elementwise ``rtol``), computed in float64 whatever the dtypes of the two tensors.

Test files import the helpers with ``from tests.conftest import assert_close``: ``tests`` is a package (it has an
``__init__.py``), so pytest imports this file as the module ``tests.conftest`` and the import returns that same
module. The float64 reference the helpers usually compare against is :mod:`tests.reference`.

Example:
    >>> expected = torch.tensor([1.0, -4.0], dtype=torch.float64)
    >>> assert_close(expected + torch.tensor([0.0, 1e-10], dtype=torch.float64), expected)  # 2.5e-11 relative
    >>> assert_differs(expected * 1.01, expected)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import tracin_func as tc


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, *, msg: object = "") -> None:
    """The relative error of ``actual`` against ``expected`` is at most ``rtol``:
    ``max |actual - expected| <= rtol * max |expected|`` in float64, with equal shapes (dtypes may differ) and a
    non-zero ``expected``."""
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = expected.to(torch.float64).abs().max().item()
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max().item()
    assert scale > 0, "degenerate reference (all zeros): the comparison would prove nothing"
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} * {scale:.3e} {msg}".rstrip()


def assert_differs(actual: torch.Tensor, other: torch.Tensor, rtol: float = 1e-3) -> None:
    """The opposite check, for a result shown to be wrong: ``max |actual - other| > rtol * max |other|``, in float64."""
    err = (actual.to(torch.float64) - other.to(torch.float64)).abs().max().item()
    scale = other.to(torch.float64).abs().max().item()
    assert err > rtol * scale, f"expected a difference: max abs diff {err:.3e} <= {rtol:g} * {scale:.3e}"


def assert_topk(top: tc.TopK, scores: torch.Tensor, k: int, *, largest: bool, rtol: float = 1e-10) -> None:
    """``top`` equals ``torch.topk(scores, k)``: scores equal (relative error at most ``rtol``); each index points at
    its score; indices equal wherever the reference has no near-tie."""
    ref_scores, ref_idx = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
    assert top.indices.shape == top.scores.shape == (scores.shape[0], k)
    assert top.indices.dtype == torch.long
    assert_close(top.scores, ref_scores, rtol)
    assert_close(torch.gather(scores, 1, top.indices), ref_scores, rtol)
    for row in range(scores.shape[0]):
        assert len(set(top.indices[row].tolist())) == k, "duplicate indices"
    tol = 1e-8 * scores.abs().max()
    ordered = torch.sort(scores, dim=1, descending=largest).values
    for row in range(scores.shape[0]):
        for j in range(k):
            gaps = (ordered[row] - ordered[row, j]).abs()
            if int((gaps <= tol).sum()) == 1:  # no other score within tol: the index is determined
                assert int(top.indices[row, j]) == int(ref_idx[row, j]), (row, j)


@pytest.fixture
def precision_restored() -> Iterator[None]:
    """torch's float32 precision settings put back as they were after the test: on torch >= 2.9 one per backend and
    op, which ``torch.set_float32_matmul_precision`` pins (a test restoring with it left oneDNN's matmul at "ieee"
    where it deferred to the process-wide setting before, for every later test of the session)."""
    holders = [torch.backends, torch.backends.mkldnn, torch.backends.cuda.matmul, torch.backends.cudnn]
    holders += [getattr(torch.backends.mkldnn, op, None) for op in ("matmul", "conv", "rnn")]
    holders += [getattr(torch.backends.cudnn, op, None) for op in ("conv", "rnn")]
    saved = [(h, h.fp32_precision) for h in holders if h is not None and hasattr(h, "fp32_precision")]
    legacy = None if saved else torch.get_float32_matmul_precision()
    yield
    for holder, value in saved:
        holder.fp32_precision = value
    if legacy is not None:
        torch.set_float32_matmul_precision(legacy)
