"""Topic names of one fleet: ``fedmask/v1/<fleet>/...``; the only place a topic string is built.

Fleet and device ids are restricted to a safe charset (letters, digits, ``_ . -``; starting with a
letter or digit; at most 64 characters), so an id can never inject an MQTT wildcard (``+ #``), a level
separator (``/``), a ``$`` system prefix, or a colon (the broker's credential file uses ``user:hash``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmask.protocol.errors import ProtocolError, Rejection

ROOT = "fedmask"
TOPIC_VERSION = "v1"  # major protocol version; bumps together with messages.PROTOCOL_VERSION
MAX_ID_LENGTH = 64
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHUNK_LEVEL = "chunk"


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise ``ProtocolError(bad_id)`` naming ``what``."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            Rejection.BAD_ID,
            f"{what} must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9_.-] starting with a letter or "
            f"digit, got {value!r}",
        )
    return value


def filter_pattern(topic_filter: str) -> re.Pattern[str]:
    """A compiled regular expression that full-matches exactly the topics ``topic_filter`` matches
    (MQTT rules: ``+`` one level, a final ``#`` any further levels or none, wildcards at the start never
    match a ``$`` topic; a ``$share/<group>/`` prefix is dropped). Compiled once per subscription:
    paho's ``topic_matches_sub`` builds a matcher tree at every call, ~12% of the aggregator's
    interpreter-lock time when every device's topic was new to the transport's route cache."""
    if topic_filter.startswith("$share/"):
        shared_parts = topic_filter.split("/", 2)
        if len(shared_parts) < 3:
            raise ValueError(f"invalid topic filter {topic_filter!r}")
        topic_filter = shared_parts[2]
    levels = topic_filter.split("/")
    if "#" in levels[:-1] or any(("+" in lv or "#" in lv) and len(lv) > 1 for lv in levels):
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    multi = levels[-1] == "#"
    parts = ["[^/]*" if level == "+" else re.escape(level) for level in (levels[:-1] if multi else levels)]
    pattern = "/".join(parts)
    if multi:
        pattern = f"{pattern}(?:/.*)?" if parts else ".*"
    if levels[0] in ("+", "#"):
        pattern = r"(?!\$)" + pattern
    return re.compile(pattern, re.DOTALL)


def chunk_topic(topic: str, index: int) -> str:
    """Where frame ``index`` of a chunked *retained* message on ``topic`` lives (see docs/protocol.md)."""
    if index < 0:
        raise ValueError(f"chunk index must be >= 0, got {index}")
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def chunk_filter(topic: str) -> str:
    """Subscription filter matching every retained chunk frame of ``topic``."""
    return f"{topic}/{CHUNK_LEVEL}/+"


def chunk_base(topic: str) -> str:
    """The topic a frame belongs to: ``topic`` without a ``/chunk/<i>`` suffix (the reassembly key)."""
    head, sep, index = topic.rpartition(f"/{CHUNK_LEVEL}/")
    return head if sep and index.isdigit() else topic


def shared(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared-subscription form: the broker gives each message to one member of ``group``."""
    return f"$share/{validate_id(group, 'shared subscription group')}/{topic_filter}"


@dataclass(frozen=True)
class Route:
    """What a received topic means: its kind, the device it names, and the chunk index if any."""

    kind: str  # "task" | "round" | "up" | "down" | "state"
    device: str | None = None
    chunk: int | None = None


class Topics:
    """The topic tree of one fleet.

    ``task`` and ``round`` are retained and written only by the aggregator; ``up/<device>`` carries a
    device's updates and results; ``down/<device>`` the aggregator's directives to it; ``state/<device>``
    its retained presence (also its last will).
    """

    PER_DEVICE = ("up", "down", "state")

    def __init__(self, fleet: str) -> None:
        self.fleet = validate_id(fleet, "fleet")
        self.prefix = f"{ROOT}/{TOPIC_VERSION}/{self.fleet}"

    def __repr__(self) -> str:
        return f"Topics({self.fleet!r})"

    @property
    def task(self) -> str:
        """Retained task specification."""
        return f"{self.prefix}/task"

    @property
    def round(self) -> str:
        """Retained announcement of the open round (with the last global body)."""
        return f"{self.prefix}/round"

    def up(self, device: str) -> str:
        """Device → aggregator: updates and results."""
        return f"{self.prefix}/up/{validate_id(device, 'device')}"

    def down(self, device: str) -> str:
        """Aggregator → device: directives, receipts, personal state."""
        return f"{self.prefix}/down/{validate_id(device, 'device')}"

    def state(self, device: str) -> str:
        """Retained presence of a device, overwritten by its last will when it drops."""
        return f"{self.prefix}/state/{validate_id(device, 'device')}"

    @property
    def all_up(self) -> str:
        """Aggregator's filter for every device's uplink."""
        return f"{self.prefix}/up/+"

    @property
    def all_state(self) -> str:
        """Aggregator's filter for every device's presence."""
        return f"{self.prefix}/state/+"

    def device_filters(self, device: str) -> list[str]:
        """Everything a device agent subscribes to (task, round with its chunks, its own downlink)."""
        return [self.task, self.round, chunk_filter(self.round), self.down(device)]

    def aggregator_filters(self, group: str | None = None) -> list[str]:
        """The aggregator's subscriptions; with ``group``, as shared subscriptions for several workers."""
        filters = [self.all_up, self.all_state]
        return [shared(group, f) for f in filters] if group else filters

    def parse(self, topic: str) -> Route:
        """Interpret a received topic of this fleet; ``ProtocolError(bad_id)`` for anything else."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError(Rejection.BAD_ID, f"topic {topic!r} is not under {self.prefix}/")
        levels = topic[len(head) :].split("/")
        chunk = None
        if len(levels) >= 3 and levels[-2] == CHUNK_LEVEL and levels[-1].isdigit():
            chunk = int(levels[-1])
            levels = levels[:-2]
        if levels in (["task"], ["round"]):
            return Route(levels[0], None, chunk)
        if len(levels) == 2 and levels[0] in self.PER_DEVICE and chunk is None:
            return Route(levels[0], validate_id(levels[1], f"device in topic {topic!r}"))
        raise ProtocolError(Rejection.BAD_ID, f"topic {topic!r} is not part of the fedmask/v1 tree")
