"""The tiny Qwen-Image builders (`workers.models.tiny_qwen_image`): both pipelines load with
the real `from_pretrained`, their prompt templates drop exactly the system prompt, and they
generate deterministic images that depend on the prompt (and, for edit, on the image)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.models.atomic import MARKER
from workers.models.tiny_qwen_image import (
    build_tiny_qwen_image,
    build_tiny_qwen_image_edit,
    load_qwen_vl_processor,
)

# Tokens after the prompt in both templates: <|im_end|> \n <|im_start|> assistant \n
SUFFIX = 5


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("qwen") / "tiny-qwen-image-edit")


@pytest.fixture(scope="module")
def t2i(t2i_dir: Path) -> Any:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(t2i_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def edit(edit_dir: Path) -> Any:
    from diffusers import QwenImageEditPipeline

    processor = load_qwen_vl_processor(edit_dir / "processor")
    pipe = QwenImageEditPipeline.from_pretrained(edit_dir, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(pipe: Any, seed: int = 0, **kwargs: Any) -> np.ndarray:
    import torch

    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    out = pipe(
        num_inference_steps=4,
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    (image,) = out.images
    assert image.size == (kwargs["width"], kwargs["height"])
    return np.asarray(image)


def noise_image(seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_builds_are_idempotent_and_deterministic(t2i_dir: Path, tmp_path: Path) -> None:
    marker = t2i_dir / MARKER
    mtime = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_qwen_image(t2i_dir) == t2i_dir
    assert time.perf_counter() - t0 < 0.5  # complete: nothing rebuilt
    assert marker.stat().st_mtime_ns == mtime
    # Same bytes from another build (the tokenizer trainer breaks ties in hash order).
    assert tree_digest(build_tiny_qwen_image(tmp_path / "again")) == tree_digest(t2i_dir)


def test_edit_checkpoint_layout(t2i_dir: Path, edit_dir: Path) -> None:
    index = json.loads((edit_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert json.loads((t2i_dir / "model_index.json").read_text())["_class_name"] == (
        "QwenImagePipeline"
    )
    video = json.loads((edit_dir / "processor" / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    # Same weights in both checkpoints.
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert tree_digest(edit_dir / part) == tree_digest(t2i_dir / part)


def test_template_drops_exactly_the_system_prompt(t2i: Any) -> None:
    prompts = ["a photo of a cat", "A red castle on a mountain at sunset, oil painting"]
    lengths = [len(t2i.tokenizer(p).input_ids) for p in prompts]
    assert lengths[0] < lengths[1]
    embeds, mask = t2i.encode_prompt(prompts[0])
    assert embeds.shape == (1, lengths[0] + SUFFIX, 32) and mask is None  # no padding
    embeds, mask = t2i.encode_prompt(prompts)
    assert embeds.shape == (2, lengths[1] + SUFFIX, 32)
    assert mask.sum(dim=1).tolist() == [n + SUFFIX for n in lengths]


def test_text_to_image(t2i: Any) -> None:
    cat = pixels(t2i, prompt="a photo of a cat")
    assert np.array_equal(cat, pixels(t2i, prompt="a photo of a cat"))
    assert not np.array_equal(cat, pixels(t2i, prompt="a photo of a dog"))
    assert not np.array_equal(cat, pixels(t2i, seed=1, prompt="a photo of a cat"))
    assert cat.std() > 0
    pixels(t2i, prompt="a photo of a cat", height=128, width=128)
    pixels(t2i, prompt="a photo of a cat", height=64, width=128)


def test_edit_prompt_embeddings_see_the_image(edit: Any) -> None:
    # The pipeline hands encode_prompt the input image resized to about 1024x1024; the
    # processor shrinks it to 112x112 for the vision tower: 16 image tokens.
    source = noise_image(0).resize((1024, 1024))
    prompt = "make it red"
    text = edit.prompt_template_encode.format(prompt)
    ids = edit.processor(text=[text], images=source, return_tensors="pt").input_ids[0]
    tokens = edit.tokenizer.convert_ids_to_tokens(ids.tolist())
    drop = edit.prompt_template_encode_start_idx
    assert tokens[drop - 3 : drop + 2] == [
        "<|im_start|>",
        "user",
        "Ċ",
        "<|vision_start|>",
        "<|image_pad|>",
    ]
    assert tokens.count("<|image_pad|>") == 16
    first, mask = edit.encode_prompt(prompt, image=source)
    assert first.shape == (1, len(ids) - drop, 32) and mask is None
    second, _ = edit.encode_prompt(prompt, image=noise_image(1).resize((1024, 1024)))
    assert first.shape == second.shape
    # Every position after <|vision_start|> sees the image (causal attention).
    assert (first[0, 1:] != second[0, 1:]).any(dim=-1).all()


def test_edit(edit: Any) -> None:
    # Each call VAE-encodes the input image at about 1024x1024 (diffusers resizes it to that
    # area whatever the output size): about a second or two each here.
    source = noise_image(0)
    red = pixels(edit, image=source, prompt="make it red")
    assert np.array_equal(red, pixels(edit, image=source, prompt="make it red"))
    assert not np.array_equal(red, pixels(edit, image=noise_image(1), prompt="make it red"))
