"""LoRA on the producer side: the `lora` field of every request, the config's registry,
the cache keys of a LoRA request and routing to the worker that holds its adapters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import DIT_QUEUE, KEYS, SMALL, where

from omni_tasks import (
    ConfigError,
    RequestValidationError,
    create_diffusion_request,
    create_multimodal_request,
    create_text_request,
    generate_image,
    get_config,
    submit,
)
from omni_tasks.config import Registries, config_from_dict, load_config
from omni_tasks.coordination import cache_directory, keys
from omni_tasks.coordination.client import get_redis
from omni_tasks.lora import directory_key
from omni_tasks.requests import OmniRequest
from omni_tasks.scheduling.policies import Route, create_policy
from omni_tasks.tasks.router import resolve_route

LORAS = {"watercolor": "tiny-flux-lora-watercolor", "ink": "/srv/loras/ink", "pirate": "p"}
WORKER = "lora-holder@host"


@pytest.fixture(autouse=True)
def registry(use_config) -> Iterator[None]:
    from dataclasses import replace

    use_config(replace(get_config(), loras=LORAS))
    yield


def test_lora_takes_names_and_name_scale_objects_on_every_request_type() -> None:
    text = create_text_request("hi", lora=["pirate"])
    image = create_diffusion_request("a fox", lora=["ink", {"name": "watercolor", "scale": 0.5}])
    multi = create_multimodal_request("a fox", lora="watercolor")
    assert [(r.name, r.scale) for r in text.lora] == [("pirate", 1.0)]
    assert image.adapters == (("ink", 1.0), ("watercolor", 0.5))  # canonical: by name
    assert multi.adapters == (("watercolor", 1.0),)
    assert create_diffusion_request("a fox", lora=[{"name": "ink", "scale": 2}]).adapters == (
        ("ink", 2.0),
    )
    message = image.to_message()
    assert message["lora"] == [{"name": "ink"}, {"name": "watercolor", "scale": 0.5}]
    assert OmniRequest.from_message(message).adapters == image.adapters
    assert "lora" not in create_text_request("hi").to_message()  # no field without adapters


@pytest.mark.parametrize(
    ("lora", "field", "message"),
    [
        (["sepia"], "lora.0.name", "unknown adapter 'sepia'; registered: ink, pirate, watercolor"),
        (["ink", "sepia"], "lora.1.name", "unknown adapter 'sepia'"),
        (["../../etc"], "lora.0.name", "letters, digits"),
        ([{"name": "ink", "scale": "1"}], "lora.0.scale", "got str"),
        ([{"name": "ink", "scale": True}], "lora.0.scale", "got bool"),
        ([{"name": "ink", "scale": float("nan")}], "lora.0.scale", "finite"),
        ([{"name": "ink", "scale": 9}], "lora.0.scale", "within -8 and 8"),
        ([{"name": "ink", "path": "/tmp/x"}], "lora.0.path", "Extra inputs"),
        (["ink", {"name": "ink", "scale": 0.5}], "lora", "'ink' more than once"),
        (["ink", "pirate", "watercolor", "ink", "pirate"], "lora", "at most 4"),
        (7, "lora", "valid list"),
    ],
)
def test_bad_adapters_are_refused_naming_the_field(lora, field: str, message: str) -> None:
    with pytest.raises(RequestValidationError) as err:
        create_diffusion_request(
            "a fox", lora=lora, registries=Registries.from_config(get_config())
        )
    assert err.value.field == field and message in str(err.value)


def test_request_models_check_shape_and_entry_points_check_the_registry() -> None:
    """Without registries in the validation context a name is checked for its shape only
    (`create_*_request` given none too: the send checks it against its app's);
    `create_*_request` checks it against the registries it is given."""
    message = {"request_type": "diffusion", "prompt": "a fox", "lora": ["sepia"]}
    assert OmniRequest.from_message(message).adapters == (("sepia", 1.0),)
    assert create_diffusion_request("a fox", lora=["sepia"]).adapters == (("sepia", 1.0),)
    with pytest.raises(RequestValidationError) as err:
        OmniRequest.from_message(message, Registries.from_config(get_config()))
    assert err.value.field == "lora.0.name"
    with pytest.raises(RequestValidationError) as err:
        OmniRequest.from_message({**message, "lora": ["../x"]})
    assert err.value.field == "lora.0.name"  # the shape of a name, without registries too
    own = Registries(loras={"sepia": "/srv/sepia"})
    assert create_diffusion_request("a fox", lora=["sepia"], registries=own).lora[0].name == "sepia"
    with pytest.raises(RequestValidationError) as err:
        create_diffusion_request("a fox", lora=["ink"], registries=own)
    assert "registered: sepia" in str(err.value)


def test_a_message_cannot_bring_its_own_registries() -> None:
    """A message's or a JSON body's "registries" is an unknown field, never the context."""
    given = {"loras": {"sepia": "/x"}}
    with pytest.raises(RequestValidationError) as err:
        generate_image.build_request({"prompt": "a fox", "registries": given})
    assert err.value.field == "registries"
    with pytest.raises(RequestValidationError) as err:
        create_diffusion_request("a fox", lora=["ink"], registries=given)
    assert err.value.field == "registries"


def test_an_unknown_adapter_sends_nothing(redis_client) -> None:
    with pytest.raises(RequestValidationError) as err:
        generate_image.delay(prompt="a fox", lora=["sepia"], **SMALL)
    assert err.value.field == "lora.0.name"
    made = create_diffusion_request("a fox", lora=["sepia"], **SMALL)  # no registries given
    with pytest.raises(RequestValidationError) as err:
        submit(made)  # checked against the app's
    assert err.value.field == "lora.0.name"
    assert not any(
        redis_client.llen(k) for q in ("diffusion", DIT_QUEUE) for k in keys.queue_keys(q)
    )
    assert not redis_client.zcard(KEYS.ledger_open())


def test_the_registry_is_checked_when_the_config_loads(tmp_path) -> None:
    assert load_config(env={"OMNI_LORAS": '{a: /x, "b.2": rel/b}'}).loras == {
        "a": "/x",
        "b.2": "rel/b",
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict({"loras": {"no spaces": "/x"}})
    assert err.value.field == "loras.no spaces"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"loras": {"a": " "}})
    assert err.value.field == "loras.a"
    for bad, field in (
        ({"max_lora_rank": 12}, "lora.max_lora_rank"),
        ({"max_loras": 8, "max_cpu_loras": 4}, "lora.max_cpu_loras"),
        ({"memory_gib": 0}, "lora.memory_gib"),
    ):
        with pytest.raises(ConfigError) as err:
            config_from_dict({"lora": bad})
        assert err.value.field == field


def test_a_lora_request_never_shares_a_base_entry_but_shares_embeddings() -> None:
    config = get_config()
    base = create_diffusion_request("a fox", seed=3)
    styled = create_diffusion_request("a fox", seed=3, lora=["watercolor"])
    zero = create_diffusion_request("a fox", seed=3, lora=[{"name": "watercolor", "scale": 0}])
    both = create_diffusion_request("a fox", seed=3, lora=["ink", "watercolor"])
    swapped = create_diffusion_request("a fox", seed=3, lora=["watercolor", "ink"])
    latents = {cache_directory.dit_keys(r, config).latents for r in (base, styled, zero, both)}
    assert len(latents) == 4
    assert cache_directory.dit_keys(both, config) == cache_directory.dit_keys(swapped, config)
    # Adapters change only the transformer: the text encoders' embeddings are shared.
    assert cache_directory.dit_keys(styled, config).embeddings == (
        cache_directory.dit_keys(base, config).embeddings
    )
    text = create_text_request("hi", seed=1)
    assert text.generate_cache_key() != create_text_request("hi", seed=1, lora=["pirate"])
    assert (
        base.generate_cache_key() == create_diffusion_request("a fox", seed=3).generate_cache_key()
    )


def beat(client, hostname: str) -> None:
    client.hset(KEYS.worker(hostname), mapping={"hostname": hostname, "concurrency": 2})
    client.expire(KEYS.worker(hostname), 30)


def test_a_request_goes_to_the_live_worker_holding_its_adapter(redis_client) -> None:
    fields = {"prompt": "a fox", "seed": 5, **SMALL}
    request = create_diffusion_request(**fields, lora=["ink"])
    config = get_config()
    assert cache_directory.affinity_keys(request, config) == [
        cache_directory.dit_keys(request, config).latents,
        directory_key("ink", config.diffusion.model),
        cache_directory.dit_keys(request, config).embeddings,
    ]
    policy = create_policy(config)
    pool = Route(DIT_QUEUE, policy.route(request, "dit").level)  # the model's queue
    cache_directory.record_insert(
        get_redis(), WORKER, "diffusion", directory_key("ink", config.diffusion.model), 4096
    )
    assert resolve_route(request, "dit", policy, redis_client) == pool  # no heartbeat: not live
    beat(redis_client, WORKER)
    own = KEYS.worker_queue(WORKER)
    assert resolve_route(request, "dit", policy, redis_client).queue == own
    sent = generate_image.delay(**fields, lora=["watercolor", "ink"])
    assert where(redis_client, sent.id, queues=(own,)) == (own, pool.level)
    assert resolve_route(create_diffusion_request(**fields), "dit", policy, redis_client) == pool
    # A multimodal DiT stage's prompt is written later, but its adapters are known now.
    multi = create_multimodal_request("a fox", lora=["ink"])
    assert resolve_route(multi, "dit", policy, redis_client).queue == own
    assert resolve_route(multi, "ar", policy, redis_client) == policy.route(multi, "ar")


def test_adapter_uses_are_counted_per_pool(redis_client) -> None:
    cache_directory.count_adapter(get_redis(), "diffusion", hit=False, load_s=0.25)
    cache_directory.count_adapter(get_redis(), "diffusion", hit=True)
    cache_directory.count_adapter(get_redis(), "diffusion", hit=True)
    stats = cache_directory.adapter_stats(get_redis(), "diffusion")
    assert stats == {"hits": 2, "misses": 1, "hit_rate": 2 / 3, "load_s_sum": 0.25}


def test_the_demo_shows_two_styles_and_a_text_adapter(use_config) -> None:
    from dataclasses import replace

    from omni_tasks.dev.demo import DEMO_LORAS, _workload

    use_config(replace(get_config(), loras=DEMO_LORAS))
    jobs = [(kind, task.build_request(kwargs)) for kind, task, kwargs in _workload()]
    compared = [r for kind, r in jobs if kind in ("base image", "lora image")]
    assert [r.adapters for r in compared] == [(), (("watercolor", 1.0),), (("ink", 1.0),)]
    assert [kind for kind, r in jobs if kind.endswith(" image")][0] == "base image"
    assert len({(r.prompt, r.seed) for r in compared}) == 1
    assert [r.adapters for kind, r in jobs if kind == "lora text"] == [(("pirate", 1.0),)]
