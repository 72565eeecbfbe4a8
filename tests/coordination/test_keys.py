"""Redis key names: ours all live under a `KeySpace`'s prefix; kombu's priority lists are
named `<queue>` and `<queue>:<level>`; a worker's own queue name keeps ':' out."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from helpers import KEYS

from omni_tasks.coordination import keys
from omni_tasks.coordination.keyspace import KeySpace, keyspace

QUEUE_NAMES = {"worker_queue"}
HOSTS = ["diffusion-1a2b3c@node-7", "w1@host.example.com", "plain", "with-dash_and.dot"]


def prefixed_keys(space: KeySpace) -> list[Callable[..., str]]:
    """Every key of `space` besides the queue names."""
    return [
        getattr(space, name)
        for name, _ in inspect.getmembers(KeySpace, inspect.isfunction)
        if not name.startswith("_") and name not in QUEUE_NAMES
    ]


def test_the_scan_sees_every_key() -> None:
    names = {f.__name__ for f in prefixed_keys(KEYS)}
    assert {"stats", "rejected", "revoked", "worker", "cache_holders", "flight_lease"} <= names
    assert len(names) >= 11


@pytest.mark.parametrize("prefix", ["omni", "staging.omni", "team-b"])
def test_every_key_starts_with_the_prefix(prefix: str) -> None:
    made = []
    for function in prefixed_keys(keyspace(prefix)):
        arguments = ["x"] * len(inspect.signature(function).parameters)
        made.append(function(*arguments))
    assert made and all(key.startswith(prefix + ":") for key in made), made
    assert len(set(made)) == len(made)  # no two kinds of key collide
    assert keyspace(prefix).worker_queue("w1@h").startswith(prefix + ".")


def test_a_keyspace_is_one_per_prefix_and_needs_no_config() -> None:
    assert keyspace("ks") is keyspace("ks")
    assert KeySpace("elsewhere").revoked("t1") == "elsewhere:revoked:t1"
    assert keyspace("other").revoked("t1") != KEYS.revoked("t1")


def test_keys_holds_only_the_queue_names_kombu_gives() -> None:
    """Every key under a prefix is named by a `KeySpace`; `keys` keeps what needs none."""
    functions = {
        n for n, f in inspect.getmembers(keys, inspect.isfunction) if f.__module__ == keys.__name__
    }
    assert functions == {"queue_key", "queue_keys", "parse_queue_key", "model_queue"}


@pytest.mark.parametrize(
    "queue", ["ar", "diffusion", "text-pool.v2", *map(KEYS.worker_queue, HOSTS)]
)
def test_parse_queue_key_inverts_queue_key_for_every_level(queue: str) -> None:
    for level in keys.PRIORITY_STEPS:
        assert keys.parse_queue_key(keys.queue_key(queue, level)) == (queue, level)


def test_queue_keys_are_kombus_lists() -> None:
    assert keys.PRIORITY_STEPS == tuple(range(10))
    assert keys.queue_key("ar", 0) == "ar"  # level 0 is the bare name
    assert keys.queue_key("ar", 6) == "ar\x06\x166"  # kombu's default separator
    assert keys.queue_keys("diffusion") == ["diffusion"] + [
        f"diffusion\x06\x16{i}" for i in range(1, 10)
    ]


def test_parse_queue_key_leaves_other_names_whole() -> None:
    assert keys.parse_queue_key("ar") == ("ar", 0)
    assert keys.parse_queue_key("queue:ten") == ("queue:ten", 0)
    assert keys.parse_queue_key("queue:10") == ("queue:10", 0)  # not a level
    assert keys.parse_queue_key("queue:") == ("queue:", 0)
    assert keys.parse_queue_key("ar:6") == ("ar:6", 0)  # the colon separator: not a level


@pytest.mark.parametrize("host", HOSTS)
def test_a_worker_queue_contains_no_separator(host: str) -> None:
    # kombu joins a binding's fields with the same separator it puts before a level.
    name = KEYS.worker_queue(host)
    assert keys.PRIORITY_SEP not in name
    assert host in name
    assert KEYS.worker_queue(host) != KEYS.worker_queue(host + "x")


@pytest.mark.parametrize("model", ["tiny-flux", "flux-b", "Qwen/Qwen-Image", "sd3.5_large"])
def test_a_model_queue_is_the_pool_queue_dot_the_model(model: str) -> None:
    name = keys.model_queue("diffusion", model)
    assert name == f"diffusion.{model}"
    assert keys.PRIORITY_SEP not in name  # a queue name, as a worker's own queue
    for level in keys.PRIORITY_STEPS:
        assert keys.parse_queue_key(keys.queue_key(name, level)) == (name, level)
    assert keys.model_queue("dit-pool", model) != name
