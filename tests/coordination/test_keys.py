"""Redis key names: ours all live under the configured prefix; kombu's priority lists are
named `<queue>` and `<queue>:<level>`; a worker's own queue name keeps ':' out."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace

import pytest

from omni_tasks import get_config
from omni_tasks.coordination import keys

QUEUE_FUNCTIONS = {"queue_key", "queue_keys", "parse_queue_key", "worker_queue", "model_queue"}
HOSTS = ["diffusion-1a2b3c@node-7", "w1@host.example.com", "plain", "with-dash_and.dot"]


def prefixed_key_functions() -> list[Callable[..., str]]:
    """Every key function of the module besides the queue names: one argument each."""
    found = [
        f
        for name, f in inspect.getmembers(keys, inspect.isfunction)
        if f.__module__ == keys.__name__ and not name.startswith("_")
    ]
    return [f for f in found if f.__name__ not in QUEUE_FUNCTIONS]


def test_the_scan_sees_every_key_function() -> None:
    names = {f.__name__ for f in prefixed_key_functions()}
    assert {"stats", "rejected", "revoked", "worker", "cache_holders", "flight_lease"} <= names
    assert len(names) >= 11


@pytest.mark.parametrize("prefix", ["omni", "staging.omni", "team-b"])
def test_every_key_starts_with_the_prefix(use_config, prefix: str) -> None:
    use_config(replace(get_config(), key_prefix=prefix))
    made = []
    for function in prefixed_key_functions():
        arguments = ["x"] * len(inspect.signature(function).parameters)
        made.append(function(*arguments))
    assert made and all(key.startswith(prefix + ":") for key in made), made
    assert len(set(made)) == len(made)  # no two kinds of key collide
    assert keys.worker_queue("w1@h").startswith(prefix + ".")


def test_key_names_follow_the_config_prefix(use_config) -> None:
    default = keys.revoked("t1")
    use_config(replace(get_config(), key_prefix="other"))
    assert keys.revoked("t1") == "other:revoked:t1" != default


@pytest.mark.parametrize(
    "queue", ["ar", "diffusion", "text-pool.v2", *map(keys.worker_queue, HOSTS)]
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
    name = keys.worker_queue(host)
    assert keys.PRIORITY_SEP not in name
    assert host in name
    assert keys.worker_queue(host) != keys.worker_queue(host + "x")


@pytest.mark.parametrize("model", ["tiny-flux", "flux-b", "Qwen/Qwen-Image", "sd3.5_large"])
def test_a_model_queue_is_the_pool_queue_dot_the_model(model: str) -> None:
    name = keys.model_queue("diffusion", model)
    assert name == f"diffusion.{model}"
    assert keys.PRIORITY_SEP not in name  # a queue name, as a worker's own queue
    for level in keys.PRIORITY_STEPS:
        assert keys.parse_queue_key(keys.queue_key(name, level)) == (name, level)
    assert keys.model_queue("dit-pool", model) != name


def test_each_key_function_is_the_process_keyspace_s(use_config) -> None:
    """`keys.<name>(...)` is `KeySpace(<the process config's prefix>).<name>(...)`, for
    every key of a `KeySpace`, and a context's own `KeySpace` needs no config."""
    from omni_tasks.coordination.keyspace import KeySpace, keyspace

    use_config(replace(get_config(), key_prefix="ks"))
    methods = [n for n, _ in inspect.getmembers(KeySpace, inspect.isfunction) if n[0] != "_"]
    assert {f.__name__ for f in prefixed_key_functions()} | {"worker_queue"} == set(methods)
    for name in methods:
        arguments = ["x"] * (len(inspect.signature(getattr(KeySpace, name)).parameters) - 1)
        assert getattr(keys, name)(*arguments) == getattr(keyspace("ks"), name)(*arguments)
    assert keyspace("ks") is keyspace("ks")
    assert KeySpace("elsewhere").revoked("t1") == "elsewhere:revoked:t1"
