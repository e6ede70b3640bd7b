"""Class names for a device's data, from the facts its data file carries (``meta``).

HMP names its activities, CIFAR-10 ships ``label_names``, Shakespeare's classes are the next character
of its vocabulary, and the IDX sets (Fashion-MNIST, MNIST, EMNIST) carry no names, so the known ones
are written out here. Anything else gets ``class <n>``.
"""

from __future__ import annotations

import string
from typing import Any

FASHION_MNIST = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS = tuple(string.digits)
# EMNIST splits whose class order is a known alphabet (byclass: digits, upper, lower).
EMNIST = {
    "digits": DIGITS,
    "mnist": DIGITS,
    "byclass": DIGITS + tuple(string.ascii_uppercase) + tuple(string.ascii_lowercase),
    "letters": tuple(string.ascii_lowercase),
}


def label_names(meta: dict[str, Any], num_classes: int) -> list[str]:
    """One name per class index: what a person reads instead of the number."""
    names = _known(meta)
    if names is None or len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return [str(name) for name in names]


def _known(meta: dict[str, Any]) -> list[str] | tuple[str, ...] | None:
    if isinstance(meta.get("label_names"), list):
        return meta["label_names"]
    if isinstance(meta.get("activities"), list):  # HMP
        return meta["activities"]
    if isinstance(meta.get("vocab"), str):  # Shakespeare: the next character, then "unknown"
        return [repr(ch)[1:-1] if ch in "\n\t" else ch for ch in meta["vocab"]] + ["<unknown>"]
    workload = meta.get("workload")
    if workload == "fashion_mnist":
        return FASHION_MNIST
    if workload == "mnist":
        return DIGITS
    if workload == "emnist":
        return EMNIST.get(str(meta.get("emnist_split")))
    return None
