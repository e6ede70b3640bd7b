"""The asynchronous-round rule both transports apply: how much a late update counts.

An update trained from the global body of round ``b`` that arrives while round ``r`` is open has
staleness ``s = r - b``. It is weighted by ``1 / (1 + s) ** alpha`` while ``s <= staleness_bound`` and
refused as ``stale_round`` beyond (the aggregator still records the refusal). ``alpha`` comes from the
task's ``hyper["staleness_alpha"]`` (default 0.5: a one-round-late update counts 0.71, three rounds
late 0.5).
"""

from __future__ import annotations

from fedmask.protocol.errors import ProtocolError, Rejection

DEFAULT_STALENESS_ALPHA = 0.5


def staleness_weight(
    open_round: int, base_round: int, *, bound: int, alpha: float = DEFAULT_STALENESS_ALPHA
) -> float:
    """Weight of an update trained from ``base_round`` arriving during ``open_round``.

    Raises ``ProtocolError(future_round)`` when ``base_round`` is after the open round and
    ``ProtocolError(stale_round)`` when the staleness exceeds ``bound``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    staleness = open_round - base_round
    if staleness < 0:
        raise ProtocolError(
            Rejection.FUTURE_ROUND, f"trained from round {base_round}, but round {open_round} is the open one"
        )
    if staleness > bound:
        raise ProtocolError(
            Rejection.STALE_ROUND,
            f"trained from round {base_round}, {staleness} rounds before the open round {open_round} "
            f"(bound {bound})",
        )
    return float((1.0 + staleness) ** -alpha)
