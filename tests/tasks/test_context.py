"""The producer context: the Celery app carries the config and Redis client its sends
use, and the send path takes them from there, not from the process config."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from omni_tasks import QueueFullError, app, generate_text, get_config
from omni_tasks.coordination import admission
from omni_tasks.tasks.context import PROCESS, ProducerContext, producer_context


@pytest.fixture
def attached() -> Iterator[ProducerContext]:
    """The app's context, given its own config for one test."""
    context = app.omni
    yield context
    context.attached = None


def test_a_context_follows_the_process_config_until_one_is_attached(use_config) -> None:
    own = replace(get_config(), key_prefix="mine")
    assert ProducerContext(own).config is own
    assert ProducerContext(own).keys.revoked("t") == "mine:revoked:t"
    use_config(replace(get_config(), key_prefix="process"))
    assert ProducerContext().keys.prefix == "process"
    assert producer_context(object()) is PROCESS  # an app without one: the process's
    assert producer_context(app) is app.omni


def test_a_send_admits_under_the_app_s_config(redis_client, attached) -> None:
    config = get_config()
    attached.attached = replace(config, scheduler=replace(config.scheduler, max_queue_size=1))
    generate_text.delay(prompt="first")
    with pytest.raises(QueueFullError, match="max_queue_size=1"):
        generate_text.delay(prompt="second")
    assert admission.count(redis_client, "ar") == 1
    assert config.scheduler.max_queue_size != 1  # the process config is not it
