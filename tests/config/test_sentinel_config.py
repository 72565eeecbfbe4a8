"""Redis Sentinel in the config: `sentinel://` URLs for `redis_url` / `broker_url`, the
master's name in `redis_sentinel_master`, and what the Celery settings and the clients
make of them (no server needed: nothing here connects)."""

from __future__ import annotations

import pytest

from omni_tasks.config import CoreModuleConfig
from omni_tasks.config.loading import DEFAULT_CONFIG_FILE, load_config
from omni_tasks.coordination.client import redacted, sentinel_params
from omni_tasks.errors import ConfigError
from omni_tasks.tasks import transport
from omni_tasks.tasks.celery_app import celery_settings

URL = "sentinel://:pw@10.0.0.1:26379/3;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_sentinel_urls_and_the_master_name_come_from_the_environment() -> None:
    env = {"OMNI_REDIS_URL": URL, "OMNI_REDIS_SENTINEL_MASTER": "omni-master"}
    config = load_config(DEFAULT_CONFIG_FILE, env=env)
    assert config.redis_url == URL and config.redis_sentinel_master == "omni-master"
    assert config.broker_is_redis
    assert load_config(DEFAULT_CONFIG_FILE, env={}).redis_sentinel_master == "mymaster"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OMNI_REDIS_URL": "sentinel://h:26379;redis://h:6379"}, "redis_url"),
        ({"OMNI_REDIS_URL": "sentinel://:pw@/0"}, "redis_url"),
        ({"OMNI_BROKER_URL": "sentinel://h:x"}, "broker_url"),
        ({"OMNI_REDIS_URL": URL, "OMNI_REDIS_SENTINEL_MASTER": " "}, "redis_sentinel_master"),
    ],
)
def test_bad_sentinel_settings_name_their_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, env=env)
    assert info.value.field == field


def test_the_url_gives_the_sentinels_and_the_masters_db_and_password() -> None:
    params = sentinel_params(URL)
    assert params.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert params.master_kwargs == {"db": 3, "password": "pw"}
    assert "pw" not in redacted(URL) and redacted(URL).count("sentinel://") == 3


def test_celery_uses_the_sentinel_transport_and_backend_with_the_master_name() -> None:
    config = CoreModuleConfig(redis_url=URL, redis_sentinel_master="omni-master")
    settings = celery_settings(config)
    assert settings["broker_transport"] == transport.SENTINEL_TRANSPORT_ALIAS
    options = settings["broker_transport_options"]
    assert options["master_name"] == "omni-master" and options["sentinel_kwargs"]
    assert options["priority_steps"] == list(range(10))
    backend = settings["result_backend_transport_options"]
    assert backend["master_name"] == "omni-master"
    assert settings["result_backend"] == URL


def test_a_plain_redis_url_gets_no_sentinel_options() -> None:
    settings = celery_settings(CoreModuleConfig(redis_url="redis://h:6379/0"))
    assert settings["broker_transport"] == transport.TRANSPORT_ALIAS
    assert "master_name" not in settings["broker_transport_options"]
    assert settings["result_backend_transport_options"] == {}
