"""Tiny random-weight Qwen-Image pipelines (text-to-image and edit), saved like real checkpoints.

`QwenImagePipeline.from_pretrained` loads the first; `QwenImageEditPipeline.from_pretrained`
the second (on a machine without torchvision, with `processor=load_qwen_vl_processor(...)`:
see there). Every component is the real class: QwenImageTransformer2DModel,
AutoencoderKLQwenImage, a Qwen2.5-VL text encoder (`Qwen2_5_VLForConditionalGeneration`, its
vision tower included: the edit pipeline feeds the input image to it), a `Qwen2Tokenizer`
trained with `tokenizers` on tiny_flux's generated corpus, FlowMatchEulerDiscreteScheduler
with Qwen-Image's settings, and for the edit pipeline a `Qwen2VLProcessor` (image processor +
that tokenizer). Weights come from fixed seeds; the edit checkpoint has the same weights.

The pipelines wrap each prompt in a chat template and drop its first
`prompt_template_encode_start_idx` tokens: 34 (text-to-image) or 64 (edit), the system prompt
through "user\\n". With the real tokenizer each pre-tokenized piece of the templates is one
token; the tokenizer here is built so that this holds too, and the build checks both counts.

The VAE keeps Qwen-Image's 8x downsampling and 16 latent channels, so image sizes must be
multiples of 16, as with the real model. The edit pipeline resizes its input image to about
1024x1024 (hard-coded in diffusers) and VAE-encodes it, adding (1024/16)^2 = 4096 image
tokens to the transformer's input: an edit takes a few seconds on a CPU, a text-to-image
call a tenth of that.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, token_ids
from workers.models.tiny_flux import _corpus

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

SEED = 0
# Weights come from torch's global RNG: two builds in one process must not interleave.

# Hidden size of the text encoder: the transformer's joint_attention_dim.
_TEXT_DIM = 32

_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The pipelines' prompt templates and how many leading tokens they drop (diffusers 0.42,
# `QwenImagePipeline.__init__`, `QwenImageEditPipeline.__init__`); the build compares them
# with the pipeline's own (`_check_template`).
_TEMPLATES = {
    "QwenImagePipeline": (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
        "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        34,
    ),
    "QwenImageEditPipeline": (
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
        "texture, objects, background), then explain how the user's text instruction should "
        "alter or modify the image. Generate a new image that meets the user's requirements "
        "while maintaining consistency with the original input where appropriate.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
        "<|im_start|>assistant\n",
        64,
    ),
}

# The vision tower sees the input image resized to between these many pixels (the real
# processor allows up to 28*28*1280): a square image becomes 112x112, 8x8 patches of 14,
# merged 2x2 into 16 image tokens.
_MIN_PIXELS = 56 * 56
_MAX_PIXELS = 112 * 112


def build_tiny_qwen_image(path: Path) -> Path:
    """Write the tiny Qwen-Image pipeline to `path` once (atomically: see
    `workers.models.atomic`)."""
    return build_atomically(Path(path), "tiny-qwen-image/1", _build_text_to_image)


def build_tiny_qwen_image_edit(path: Path) -> Path:
    """Write the tiny Qwen-Image-Edit pipeline to `path` once (atomically)."""
    return build_atomically(Path(path), "tiny-qwen-image-edit/1", _build_edit)


def load_qwen_vl_processor(folder: Path) -> Qwen2VLProcessor:
    """The `Qwen2VLProcessor` saved in a Qwen-Image-Edit checkpoint's `processor/` folder.

    transformers 5.x builds a Qwen2-VL processor only with a video processor, and video
    processors need torchvision, which this project's CPU stack lacks (PyPI's torchvision
    wheels fail to import against CPU torch). So here `QwenImageEditPipeline
    .from_pretrained(path)` fails for any checkpoint, real or tiny; pass it
    `processor=load_qwen_vl_processor(path / "processor")`. Without torchvision this builds
    the real class from the folder's tokenizer and image processor, with no video processor
    (the pipeline never passes videos); with torchvision it is `Qwen2VLProcessor.from_pretrained`.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return Qwen2VLProcessor.from_pretrained(folder)
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    check = Qwen2VLProcessor.check_argument_for_proper_class

    def check_all_but_video(name: str, arg: Any) -> Any:
        # The check of a video processor looks up its base class, which needs torchvision.
        return None if name == "video_processor" and arg is None else check(processor, name, arg)

    processor.check_argument_for_proper_class = check_all_but_video  # type: ignore[method-assign]
    try:
        Qwen2VLProcessor.__init__(
            processor,
            image_processor=AutoImageProcessor.from_pretrained(folder),
            tokenizer=AutoTokenizer.from_pretrained(folder),
            video_processor=None,
        )
    finally:
        del processor.check_argument_for_proper_class
    return processor


def _build_text_to_image(out: Path) -> None:
    _build_pipeline(out, edit=False)


def _build_edit(out: Path) -> None:
    _build_pipeline(out, edit=True)


def _build_pipeline(out: Path, edit: bool) -> None:
    """Build every component and save the pipeline (`QwenImageEditPipeline` if `edit`)."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    tok_dir = out / "_tokenizer"
    tokenizer = _tokenizer(tok_dir)
    # One RNG stream for all weights: the build order below is part of the format.
    with seeded_torch(SEED):
        components: dict[str, Any] = {
            "text_encoder": _text_encoder(tokenizer),
            "vae": _vae(),
            "transformer": _transformer(),
        }
    for module in components.values():
        module.eval()
    components.update(scheduler=_scheduler(), tokenizer=tokenizer)
    pipe: Any
    if edit:
        # The processor cannot be built here (see `load_qwen_vl_processor`): `_save_processor`
        # writes its folder and model_index.json entry.
        pipe = QwenImageEditPipeline(processor=None, **components)
    else:
        pipe = QwenImagePipeline(**components)
    _check_template(pipe)
    _save(pipe, out, tok_dir)
    if edit:
        _save_processor(out, tokenizer, tok_dir)
    shutil.rmtree(tok_dir)


def _check_template(pipe: Any) -> None:
    """The pipeline drops exactly its template's system prompt, as with the real tokenizer."""
    name = type(pipe).__name__
    template, drop = _TEMPLATES[name]
    if (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx) != (template, drop):
        raise RuntimeError(f"{name}'s prompt template changed: update _TEMPLATES")
    system = template[: template.index("user\n") + len("user\n")]
    n = len(pipe.tokenizer(system).input_ids)
    if n != drop:
        raise RuntimeError(f"{name}: the system prompt is {n} tokens, the pipeline drops {drop}")


# Tokenizer


def _template_texts() -> list[str]:
    """The templates' text between special tokens, without the prompt slot."""
    specials = "|".join(re.escape(t) for t in _SPECIAL_TOKENS)
    texts = []
    for template, _ in _TEMPLATES.values():
        texts += [t for t in re.split(specials, template.replace("{}", "")) if t]
    return texts


def _pre_tokenizer() -> Any:
    """Qwen2Tokenizer's pre-tokenizer (transformers 5.x rebuilds it around vocab + merges)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bpe(corpus: list[str], size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges, trained with `tokenizers`, made canonical.

    The trainer breaks count ties in hash order, so merge order and ids vary between runs
    (the set of merges does not). Merges are ordered by length, then text (parts are always
    shorter than their merge, so the order stays valid); that order splits some words the
    trainer had merged. So each piece of the templates, then each corpus word that the trainer
    made one token (most frequent first), gets merges appended that join what is left of it:
    appended last, they cannot split an earlier piece again.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + _template_texts() * 10, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = sorted(
        (tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]),
        key=lambda m: (len(m[0]) + len(m[1]), m),
    )
    pieces = [p for text in _template_texts() for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    counts = Counter(p for line in corpus for p, _ in tok.pre_tokenizer.pre_tokenize_str(line))
    pieces += sorted((w for w in counts if w in model["vocab"]), key=lambda w: (-counts[w], w))
    ranks = {merge: i for i, merge in enumerate(merges)}
    for piece in dict.fromkeys(pieces):
        parts = _apply_bpe(piece, ranks)
        for i in range(1, len(parts)):
            ranks.setdefault(("".join(parts[:i]), parts[i]), len(ranks))
    merges = sorted(ranks, key=ranks.__getitem__)
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    regular = dict.fromkeys([*base, *(a + b for a, b in merges)])
    vocab = {token: i for i, token in enumerate([*regular, *_SPECIAL_TOKENS])}
    return vocab, merges


def _apply_bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split `piece` as a BPE model with these merge ranks does: lowest rank first."""
    parts = list(piece)
    while len(parts) > 1:
        rank, i = min((ranks.get(p, len(ranks)), i) for i, p in enumerate(pairwise(parts)))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _tokenizer(out: Path) -> Qwen2Tokenizer:
    """Train the tokenizer, save it to `out` (both formats) and load it back."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe(_corpus())
    Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[
            t for t in _SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
        ],
        model_max_length=32768,
    ).save_pretrained(out)
    # transformers 5.x reads tokenizer.json; 4.x's slow Qwen2Tokenizer reads vocab.json +
    # merges.txt, so write those too.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return Qwen2Tokenizer.from_pretrained(out)


# Models


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # Head dim 8: 4 rotary frequencies, split over (time, height, width) positions.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 1, 1],
            },
            **token_ids(tokenizer),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": _TEXT_DIM,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _vae() -> AutoencoderKLQwenImage:
    from diffusers import AutoencoderKLQwenImage

    # 3 downsampling levels (8x, like the real VAE) and 16 latent channels. 8 channels
    # throughout: at 1024x1024 (an edit's input) fewer run slower, on CPU conv3d's slow path.
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def _transformer() -> QwenImageTransformer2DModel:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM,
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's scheduler config.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


# Saving


def _save(pipe: Any, out: Path, tok_dir: Path) -> None:
    """`save_pipeline` (quiet about the edit pipeline's processor, saved apart), plus the
    tokenizer's files for transformers 4.x."""
    save_pipeline(pipe, out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_dir / name, out / "tokenizer" / name)


def _save_processor(out: Path, tokenizer: Qwen2Tokenizer, tok_dir: Path) -> None:
    """The edit pipeline's `processor/` folder, laid out like Qwen-Image-Edit's, and its
    model_index.json entry.

    Written file by file: `Qwen2VLProcessor.save_pretrained` needs a video processor (see
    `load_qwen_vl_processor`). The video processor's config names the real class, with this
    checkpoint's sizes, for machines with torchvision.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    folder = out / "processor"
    folder.mkdir()
    tokenizer.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_dir / name, folder / name)
    # Saved as "Qwen2VLImageProcessor": AutoImageProcessor picks the torchvision or PIL backend.
    Qwen2VLImageProcessorPil(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS).save_pretrained(folder)
    video = {
        "merge_size": 2,
        "patch_size": 14,
        "size": {"longest_edge": _MAX_PIXELS, "shortest_edge": _MIN_PIXELS},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
