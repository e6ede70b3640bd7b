"""protocol.staleness: weight = (1 + staleness) ** -alpha up to the bound, refusals beyond."""

from __future__ import annotations

import pytest

from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.staleness import DEFAULT_STALENESS_ALPHA, staleness_weight


@pytest.mark.parametrize("staleness", [0, 1, 2, 3])
def test_weight_decays_with_staleness(staleness: int) -> None:
    weight = staleness_weight(10, 10 - staleness, bound=3)
    assert weight == pytest.approx((1 + staleness) ** -DEFAULT_STALENESS_ALPHA)
    assert 0 < weight <= 1


def test_alpha_zero_weights_every_admitted_update_equally() -> None:
    assert staleness_weight(9, 7, bound=5, alpha=0.0) == 1.0
    assert staleness_weight(9, 7, bound=5, alpha=1.0) == pytest.approx(1 / 3)


def test_past_the_bound_is_stale_and_ahead_is_future() -> None:
    with pytest.raises(ProtocolError) as err:
        staleness_weight(10, 6, bound=3)
    assert err.value.reason is Rejection.STALE_ROUND and "bound 3" in err.value.detail
    with pytest.raises(ProtocolError) as err:
        staleness_weight(10, 11, bound=3)
    assert err.value.reason is Rejection.FUTURE_ROUND
    with pytest.raises(ValueError):
        staleness_weight(10, 9, bound=3, alpha=-0.1)
