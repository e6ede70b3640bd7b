"""Federated strategies, each a client half and a server half over the same codec."""

from __future__ import annotations

from fedmask.strategies.base import (
    ClientHalf,
    ClientUpdate,
    Evaluation,
    FinalModel,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)


def registry() -> dict[str, Strategy]:
    """Every strategy by name (imported lazily: building the registry pulls in torch)."""
    from fedmask.strategies.bnn import BnnFedAvg
    from fedmask.strategies.fedavg import FedAvg, FedAvgFineTune
    from fedmask.strategies.fedmask import FedMask, FineTuneOnly
    from fedmask.strategies.fedpm import FedPM
    from fedmask.strategies.lgfedavg import LgFedAvg
    from fedmask.strategies.local import LocalOnly
    from fedmask.strategies.perfedavg import PerFedAvg, PerFedAvgHF
    from fedmask.strategies.topk import TopK

    strategies: list[Strategy] = [FedMask(), FineTuneOnly(), FedAvg(), FedAvgFineTune(), LocalOnly()]
    strategies += [TopK(), BnnFedAvg(), PerFedAvg(), PerFedAvgHF(), LgFedAvg(), FedPM()]
    return {s.name: s for s in strategies}


def get_strategy(name: str) -> Strategy:
    strategies = registry()
    if name not in strategies:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(strategies)}")
    return strategies[name]


__all__ = [
    "ClientHalf",
    "ClientUpdate",
    "Evaluation",
    "FinalModel",
    "FitResult",
    "ServerHalf",
    "Strategy",
    "TaskSpec",
    "get_strategy",
    "registry",
]
