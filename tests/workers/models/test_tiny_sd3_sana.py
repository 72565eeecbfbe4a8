"""The tiny SD3 and Sana builders (`workers.models.tiny_sd3`, `workers.models.tiny_sana`):
the real `from_pretrained` loads what they write, generates images of the requested
size from a prompt, the same for the same seed and different for another prompt; a
second build writes the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.models.atomic import MARKER as COMPLETE_MARKER
from workers.models.tiny_sana import build_tiny_sana
from workers.models.tiny_sd3 import build_tiny_sd3


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sana(tmp_path_factory.mktemp("sana") / "tiny-sana")


@pytest.fixture(scope="module")
def sd3(sd3_dir: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sana(sana_dir: Path) -> Any:
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(sana_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: Any, prompt: str, size: int, seed: int = 7, **kwargs: Any) -> np.ndarray:
    import torch

    image = pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images[0]
    assert image.size == (size, size)
    return np.asarray(image)


def test_components_are_the_real_classes(sd3: Any, sana: Any) -> None:
    assert {k: type(v).__name__ for k, v in sd3.components.items() if v is not None} == {
        "transformer": "SD3Transformer2DModel",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5Tokenizer",  # T5TokenizerFast is an alias in transformers 5
    }
    assert sd3.vae_scale_factor == 8 and sd3.vae.config.latent_channels == 16
    assert {k: type(v).__name__ for k, v in sana.components.items()} == {
        "transformer": "SanaTransformer2DModel",
        "scheduler": "DPMSolverMultistepScheduler",
        "vae": "AutoencoderDC",
        "text_encoder": "Gemma2Model",
        "tokenizer": "GemmaTokenizer",
    }
    assert sana.vae_scale_factor == 32 and sana.vae.config.latent_channels == 32
    # Gemma's conventions: BOS first, byte fallback for characters outside the vocabulary.
    ids = sana.tokenizer("a red fox é").input_ids
    assert ids[0] == sana.tokenizer.bos_token_id
    assert sana.tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<0xC3>", "<0xA9>"]


@pytest.mark.parametrize("size", [64, 128])
def test_sd3_generates_deterministically(sd3: Any, size: int) -> None:
    a = render(sd3, "a red fox in the snow", size)
    assert np.array_equal(a, render(sd3, "a red fox in the snow", size))
    assert not np.array_equal(a, render(sd3, "a castle at night", size))
    assert not np.array_equal(a, render(sd3, "a red fox in the snow", size, seed=8))


@pytest.mark.parametrize("binning", [False, True])
@pytest.mark.parametrize("size", [64, 128])
def test_sana_generates_deterministically(sana: Any, size: int, binning: bool) -> None:
    kw = {"use_resolution_binning": binning}  # True: rendered at 512 px, resized back
    a = render(sana, "a red fox in the snow", size, **kw)
    assert np.array_equal(a, render(sana, "a red fox in the snow", size, **kw))
    assert not np.array_equal(a, render(sana, "a castle at night", size, **kw))


def test_builds_are_idempotent_and_byte_identical(
    sd3_dir: Path, sana_dir: Path, tmp_path: Path
) -> None:
    for build, built in ((build_tiny_sd3, sd3_dir), (build_tiny_sana, sana_dir)):
        mtime = (built / COMPLETE_MARKER).stat().st_mtime_ns
        assert build(built) == built  # complete: nothing rebuilt
        assert (built / COMPLETE_MARKER).stat().st_mtime_ns == mtime
        assert tree_digest(build(tmp_path / built.name)) == tree_digest(built)
