"""The diffusion model registry in the config: `models` from YAML and from `OMNI_MODELS`
(JSON or a YAML flow mapping, as `OMNI_LORAS`), names checked (a `ConfigError` naming
`models.<name>`), `diffusion_models()` always holding the pool's default, and
`model_path()` for the worker side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from omni_tasks.config import DEFAULT_CONFIG_FILE, CoreModuleConfig, ModelEntry, load_config
from omni_tasks.errors import ConfigError


def test_the_default_registry_is_the_pools_default_model() -> None:
    config = load_config(DEFAULT_CONFIG_FILE, env={})
    assert config.models == {}
    assert config.diffusion_models() == {
        "tiny-flux": ModelEntry(),
        "tiny-wan": ModelEntry(),  # diffusion.video_model
        "tiny-wan-i2v": ModelEntry(),  # diffusion.video_image_model
        "tiny-stable-audio": ModelEntry(),  # diffusion.audio_model
    }


def test_omni_models_as_json_as_the_brief_writes_it() -> None:
    env = {
        "OMNI_MODELS": '{"tiny-qwen-image": {}, '
        '"qwen": {"path": "Qwen/Qwen-Image", "family": "qwen-image"}}'
    }
    config = load_config(DEFAULT_CONFIG_FILE, env=env)
    assert config.models == {
        "tiny-qwen-image": ModelEntry(),
        "qwen": ModelEntry(path="Qwen/Qwen-Image", family="qwen-image"),
    }
    assert set(config.diffusion_models()) == {
        "tiny-qwen-image",
        "qwen",
        "tiny-flux",
        "tiny-wan",
        "tiny-wan-i2v",
        "tiny-stable-audio",
    }


def test_the_default_model_keeps_its_registry_entry() -> None:
    env = {
        "OMNI_DIFFUSION__MODEL": "flux-b",
        "OMNI_MODELS": "{flux-b: {path: /models/tiny-flux, family: flux}}",  # YAML flow
    }
    config = load_config(DEFAULT_CONFIG_FILE, env=env)
    entry = ModelEntry(path="/models/tiny-flux", family="flux")
    assert config.diffusion_models()["flux-b"] == entry
    defaults = {"tiny-wan", "tiny-wan-i2v", "tiny-stable-audio"}
    assert set(config.diffusion_models()) == {"flux-b", *defaults}


def test_models_from_yaml_an_empty_entry_takes_the_defaults(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "models:\n"
        "  black-forest-labs/FLUX.1-schnell:\n"
        "  sd3:\n    path: stabilityai/stable-diffusion-3.5-medium\n"
    )
    config = load_config(env={"OMNI_CONFIG": str(file)})
    assert config.models == {
        "black-forest-labs/FLUX.1-schnell": ModelEntry(),
        "sd3": ModelEntry(path="stabilityai/stable-diffusion-3.5-medium"),
    }


@pytest.mark.parametrize(
    ("models", "field"),
    [
        ('{"two words": {}}', "models.two words"),
        ('{"tab\\there": {}}', "models.tab\there"),
        ('{"a:b": {}}', "models.a:b"),
        ('{"ünïcode": {}}', "models.ünïcode"),
        (f'{{"{"m" * 129}": {{}}}}', f"models.{'m' * 129}"),
        ('{"": {}}', "models."),
        ('{"ok": {"pth": "x"}}', "models.ok.pth"),  # an unknown field of an entry
        ('{"ok": {"family": "  "}}', "models.ok.family"),
        ('{"ok": "Qwen/Qwen-Image"}', "models.ok"),  # an entry is a mapping
        ("[1, 2]", "models"),
    ],
)
def test_bad_registry_entries_name_the_field(models: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, env={"OMNI_MODELS": models})
    assert info.value.field == field


@pytest.mark.parametrize("name", ["m" * 128, "Qwen/Qwen-Image", "sd3.5_large", "flux-b"])
def test_names_safe_in_a_queue_name_are_taken(name: str) -> None:
    config = load_config(DEFAULT_CONFIG_FILE, env={"OMNI_MODELS": f'{{"{name}": {{}}}}'})
    assert name in config.diffusion_models()


@pytest.mark.parametrize("model", ["a:b", "a b", "tiny-flux\n"])
def test_a_default_model_that_cannot_name_a_queue_is_refused(model: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, env={"OMNI_DIFFUSION__MODEL": model})
    assert info.value.field == "diffusion.model"


def test_model_path_resolves_a_registry_path(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "flux").mkdir(parents=True)
    models = {
        "local": ModelEntry(path="checkpoints/flux"),  # under models_dir
        "absolute": ModelEntry(path=str(tmp_path / "elsewhere")),
        "hub": ModelEntry(path="Qwen/Qwen-Image"),  # not under models_dir: a hub id
        "bare": ModelEntry(),
    }
    config = replace(CoreModuleConfig(), models_dir=str(tmp_path), models=models)
    config.validate()
    assert config.model_path("local") == str(tmp_path / "checkpoints" / "flux")
    assert config.model_path("absolute") == str(tmp_path / "elsewhere")
    assert config.model_path("hub") == "Qwen/Qwen-Image"
    assert config.model_path("bare") is None
    assert config.model_path("unregistered") is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logprobs", True)],
)
def test_a_transformers_ar_pool_refuses_what_its_engine_cannot_honour(
    field: str, value: object
) -> None:
    """Named before anything is enqueued, never ignored; vLLM pools take them."""
    from omni_tasks.errors import RequestValidationError
    from omni_tasks.model_registry import check_model
    from omni_tasks.requests import create_chat_request

    vllm = load_config(DEFAULT_CONFIG_FILE, env={})
    hf = replace(vllm, ar=replace(vllm.ar, engine="transformers"))
    request = create_chat_request([{"role": "user", "content": "hi"}], **{field: value})
    check_model(request, vllm)
    with pytest.raises(RequestValidationError) as refused:
        check_model(request, hf)
    assert refused.value.field == field


def test_ar_chat_template_is_text_or_a_file(tmp_path: Path) -> None:
    from workers.engines.chat import load_chat_template

    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(text)
    assert load_chat_template(str(path)) == text
    assert load_chat_template(text) == text
    assert load_chat_template(None) is None
    config = load_config(DEFAULT_CONFIG_FILE, env={"OMNI_AR__CHAT_TEMPLATE": str(path)})
    assert config.ar.chat_template == str(path)
