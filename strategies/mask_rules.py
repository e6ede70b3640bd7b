"""How the server combines binary masks and how a device merges the result into its own scores.

Every rule starts from the same statistic: per parameter, the (staleness-weighted) share of
participating masks that keep it, ``p = counts / total``. Both directions carry binary masks only.

- ``majority``: the server sends ``G = 1[p >= 1/2]``; the device adopts ``G`` everywhere and then
  personalizes through local training. The most shared, least personal rule.
- ``overlap``: the server sends ``keep = 1[p >= keep_share]`` (and, only if ``drop_share`` is set,
  ``drop = 1[p <= drop_share]``). A device adopts the aggregate only where the fleet clearly overlaps
  and keeps its own scores everywhere else, which is where personal structure lives. Dropping by
  consensus is off by default: under label skew the output rows of a class only its few owners keep look
  like a consensus "drop" to everyone else, and adopting it deletes exactly the personal part (measured:
  it left one device in ten with a dead classifier on Fashion-MNIST shards).
- ``none``: the server sends nothing and devices never merge: mask training alone (an ablation).

Adoption keeps the magnitude of a device's own score and sets only its sign, so a weight the fleet
agrees on starts the next round on the agreed side with the device's own confidence.
"""

from __future__ import annotations

import abc

import numpy as np

from fedmask.protocol.tensor_codec import Coded
from fedmask.strategies.base import Body, DecodedBody


class MaskRule(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def server_body(self, share: np.ndarray) -> Body:
        """The downlink body for a vector of keep shares in [0, 1]."""

    @abc.abstractmethod
    def merge(self, scores: np.ndarray, body: DecodedBody) -> np.ndarray:
        """A device's new scores after it receives ``body``."""


def _adopt(scores: np.ndarray, where: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = scores.copy()
    magnitude = np.abs(out[where])
    out[where] = np.where(keep[where], magnitude, -magnitude)
    return out


class Majority(MaskRule):
    name = "majority"

    def server_body(self, share: np.ndarray) -> Body:
        return {"mask": Coded(share >= 0.5, "bits")}

    def merge(self, scores: np.ndarray, body: DecodedBody) -> np.ndarray:
        mask = body["mask"].astype(bool)
        return _adopt(scores, np.ones_like(mask), mask)


class Overlap(MaskRule):
    name = "overlap"

    def __init__(self, keep_share: float = 0.75, drop_share: float | None = None) -> None:
        if not 0.0 < keep_share <= 1.0 or (drop_share is not None and not 0.0 <= drop_share < keep_share):
            raise ValueError(f"need 0 <= drop_share < keep_share <= 1, got {drop_share}, {keep_share}")
        self.keep_share = keep_share
        self.drop_share = drop_share

    def server_body(self, share: np.ndarray) -> Body:
        body = {"keep": Coded(share >= self.keep_share, "bits")}
        if self.drop_share is not None:
            body["drop"] = Coded(share <= self.drop_share, "bits")
        return body

    def merge(self, scores: np.ndarray, body: DecodedBody) -> np.ndarray:
        keep = body["keep"].astype(bool)
        drop = body["drop"].astype(bool) if "drop" in body else np.zeros_like(keep)
        return _adopt(scores, keep | drop, keep)


class NoMerge(MaskRule):
    name = "none"

    def server_body(self, share: np.ndarray) -> Body:
        return {}

    def merge(self, scores: np.ndarray, body: DecodedBody) -> np.ndarray:
        return scores


def make_rule(name: str, **params: float) -> MaskRule:
    rules: dict[str, type[MaskRule]] = {"majority": Majority, "overlap": Overlap, "none": NoMerge}
    if name not in rules:
        raise ValueError(f"unknown mask aggregation rule {name!r}; choose one of {sorted(rules)}")
    return rules[name](**params)  # type: ignore[arg-type]
