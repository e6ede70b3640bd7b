"""protocol.topics: the fedmask/v1/<fleet>/... tree, id validation, wildcard and shared filters."""

from __future__ import annotations

import random

import paho.mqtt.client as mqtt
import pytest

from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.topics import (
    Route,
    Topics,
    chunk_base,
    chunk_filter,
    chunk_topic,
    filter_pattern,
    shared,
    validate_id,
)


def test_topic_tree_of_a_fleet() -> None:
    topics = Topics("fleet-a")
    assert topics.task == "fedmask/v1/fleet-a/task"
    assert topics.round == "fedmask/v1/fleet-a/round"
    assert topics.up("dev-1") == "fedmask/v1/fleet-a/up/dev-1"
    assert topics.down("dev-1") == "fedmask/v1/fleet-a/down/dev-1"
    assert topics.state("dev-1") == "fedmask/v1/fleet-a/state/dev-1"
    assert chunk_topic(topics.round, 3) == "fedmask/v1/fleet-a/round/chunk/3"


def test_aggregator_filters_match_every_device_and_nothing_else() -> None:
    topics = Topics("fleet-a")
    assert mqtt.topic_matches_sub(topics.all_up, topics.up("dev-7"))
    assert mqtt.topic_matches_sub(topics.all_state, topics.state("dev-7"))
    assert not mqtt.topic_matches_sub(topics.all_up, topics.down("dev-7"))
    assert not mqtt.topic_matches_sub(topics.all_up, Topics("fleet-b").up("dev-7"))
    assert topics.aggregator_filters("workers") == [
        "$share/workers/fedmask/v1/fleet-a/up/+",
        "$share/workers/fedmask/v1/fleet-a/state/+",
    ]


def test_device_filters_cover_retained_chunks_and_only_its_own_downlink() -> None:
    topics = Topics("fleet-a")
    filters = topics.device_filters("dev-1")
    assert any(mqtt.topic_matches_sub(f, chunk_topic(topics.round, 12)) for f in filters)
    assert any(mqtt.topic_matches_sub(f, topics.down("dev-1")) for f in filters)
    assert not any(mqtt.topic_matches_sub(f, topics.down("dev-2")) for f in filters)
    assert chunk_filter(topics.round) in filters


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+", "#", "$SYS", "-lead", ".hidden", "a b", "x" * 65, "dev:1", None, 7]
)
def test_unsafe_ids_are_refused(bad: object) -> None:
    with pytest.raises(ProtocolError) as err:
        validate_id(bad, "device")
    assert err.value.reason is Rejection.BAD_ID and "device" in err.value.detail


def test_fleet_and_device_are_validated_where_topics_are_built() -> None:
    with pytest.raises(ProtocolError):
        Topics("fleet/a")
    with pytest.raises(ProtocolError):
        Topics("fleet-a").up("+")
    with pytest.raises(ProtocolError):
        shared("a/b", "x")
    assert validate_id("Dev_1.a-" + "x" * 56) == "Dev_1.a-" + "x" * 56  # 64 characters is fine


@pytest.mark.parametrize(
    ("topic", "route"),
    [
        ("fedmask/v1/fleet-a/task", Route("task")),
        ("fedmask/v1/fleet-a/round", Route("round")),
        ("fedmask/v1/fleet-a/round/chunk/4", Route("round", None, 4)),
        ("fedmask/v1/fleet-a/up/dev-1", Route("up", "dev-1")),
        ("fedmask/v1/fleet-a/state/dev-9", Route("state", "dev-9")),
    ],
)
def test_parse_routes_received_topics(topic: str, route: Route) -> None:
    assert Topics("fleet-a").parse(topic) == route


@pytest.mark.parametrize(
    "topic",
    [
        "fedmask/v1/fleet-b/up/dev-1",
        "fedmask/v1/fleet-a/up",
        "fedmask/v1/fleet-a/up/dev-1/x",
        "fedmask/v1/fleet-a/up/a+b",
    ],
)
def test_parse_refuses_foreign_or_malformed_topics(topic: str) -> None:
    with pytest.raises(ProtocolError) as err:
        Topics("fleet-a").parse(topic)
    assert err.value.reason is Rejection.BAD_ID


def test_chunk_base_is_the_reassembly_key_of_a_frame() -> None:
    topics = Topics("fleet-a")
    assert chunk_base(chunk_topic(topics.round, 17)) == topics.round
    assert chunk_base(topics.round) == topics.round
    assert chunk_base(topics.up("chunk")) == topics.up("chunk")  # a device may be called "chunk"


def test_filter_pattern_matches_exactly_what_paho_matches() -> None:
    # The transport routes with compiled filters; paho's matcher is the reference for MQTT's rules.
    rng = random.Random(7)
    words = ["a", "b", "$SYS", "fedmask", "", "dev-1"]

    def topic() -> str:
        return "/".join(rng.choice(words) for _ in range(rng.randint(1, 4)))

    def topic_filter() -> str:
        levels = [rng.choice([*words, "+", "+"]) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.4:
            levels[-1] = "#"
        return "/".join(levels)

    checked = 0
    for _ in range(3000):
        f, t = topic_filter(), topic()
        expected = mqtt.topic_matches_sub(f, t)
        assert bool(filter_pattern(f).fullmatch(t)) == expected, (f, t)
        assert bool(filter_pattern(f"$share/group-1/{f}").fullmatch(t)) == expected, (f, t)
        checked += expected
    assert checked > 300  # the sample holds plenty of matches, not only misses


@pytest.mark.parametrize("bad", ["a/#/b", "a+/b", "a/b#", "#a", "$share/group"])
def test_filter_pattern_refuses_invalid_filters(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid topic filter"):
        filter_pattern(bad)
