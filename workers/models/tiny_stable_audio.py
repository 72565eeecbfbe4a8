"""Tiny random-weight Stable Audio pipeline, saved so that
`StableAudioPipeline.from_pretrained` (`tiny-stable-audio`) loads it as it loads
`stabilityai/stable-audio-open-1.0`.

Every component is the real class with tiny dimensions: `StableAudioDiTModel` (one
global token of the start and end seconds prepended, rotary positions, grouped-query
attention), `AutoencoderOobleck` (stereo at 44.1 kHz, as the real one, with fewer and
smaller downsampling stages: 256 samples a latent frame rather than 2048, so a tiny
transformer still sees a few hundred frames), `StableAudioProjectionModel` (the seconds
conditioners, 0 to 512 s as the real one), a `T5EncoderModel` with tiny_flux's T5
tokenizer (prompts padded to `MAX_SEQUENCE_LENGTH` tokens) and Stable Audio's own
`CosineDPMSolverMultistepScheduler` (its SDE noise needs `torchsde`). Like the real
pipeline, every clip is denoised at the transformer's full `sample_size` and cut to
its seconds after decoding: here `MAX_SECONDS`. Weights come from fixed seeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.atomic import build_atomically
from workers.models.building import save_pipeline, seeded_torch, tiny_t5_settings
from workers.models.tiny_flux import _tokenizers

if TYPE_CHECKING:
    from diffusers import AutoencoderOobleck, StableAudioDiTModel

SEED = 0
#: The real model's rate and channels: 44.1 kHz stereo.
SAMPLING_RATE = 44100
AUDIO_CHANNELS = 2
#: The VAE's stages: 4 * 8 * 8 = 256 samples a latent frame.
_DOWNSAMPLING = [4, 8, 8]
_LATENT_CHANNELS = 8
#: Latent frames of every clip: 384 * 256 samples, about 2.23 s at 44.1 kHz.
SAMPLE_SIZE = 384
MAX_SECONDS = SAMPLE_SIZE * 256 / SAMPLING_RATE
#: The T5 width, which the projection keeps (as the real model's 768).
_TEXT_DIM = 32
#: The tokenizer's padded prompt length (the real model's is 128).
MAX_SEQUENCE_LENGTH = 64


def _text_encoder(vocab: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**tiny_t5_settings(vocab, _TEXT_DIM, d_kv=8)))


def _vae() -> AutoencoderOobleck:
    from diffusers import AutoencoderOobleck

    return AutoencoderOobleck(
        encoder_hidden_size=2 * _LATENT_CHANNELS,  # mean and scale
        downsampling_ratios=_DOWNSAMPLING,
        channel_multiples=[1, 2, 2],
        decoder_channels=8,
        decoder_input_channels=_LATENT_CHANNELS,
        audio_channels=AUDIO_CHANNELS,
        sampling_rate=SAMPLING_RATE,
    )


def _projection() -> Any:
    from diffusers import StableAudioProjectionModel

    return StableAudioProjectionModel(
        text_encoder_dim=_TEXT_DIM, conditioning_dim=_TEXT_DIM, min_value=0, max_value=512
    )


def _transformer() -> StableAudioDiTModel:
    from diffusers import StableAudioDiTModel

    return StableAudioDiTModel(
        sample_size=SAMPLE_SIZE,
        in_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,  # rotary positions on half of it
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=_LATENT_CHANNELS,
        cross_attention_dim=32,
        time_proj_dim=32,
        global_states_input_dim=2 * _TEXT_DIM,  # the start and end seconds, side by side
        cross_attention_input_dim=_TEXT_DIM,
    )


def _scheduler() -> Any:
    from diffusers import CosineDPMSolverMultistepScheduler

    # Stable Audio Open's settings, which are the class's defaults.
    return CosineDPMSolverMultistepScheduler(
        sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, prediction_type="v_prediction"
    )


def _build(out: Path) -> None:
    """Build every component and save the pipeline to `out`."""
    from diffusers import StableAudioPipeline

    tok_dir = out / "_tokenizers"
    tokenizers = _tokenizers(tok_dir)
    tokenizer = tokenizers.t5
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    # One RNG stream for all weights: the build order below is part of the format.
    with seeded_torch(SEED):
        components: dict[str, Any] = {
            "text_encoder": _text_encoder(tokenizers.t5_vocab),
            "projection_model": _projection(),
            "vae": _vae(),
            "transformer": _transformer(),
        }
    for module in components.values():
        module.eval()
    pipe = StableAudioPipeline(tokenizer=tokenizer, scheduler=_scheduler(), **components)
    save_pipeline(pipe, out)
    shutil.rmtree(tok_dir)


def build_tiny_stable_audio(path: Path) -> Path:
    """Write the tiny text-to-audio Stable Audio pipeline to `path` once (atomically)."""
    return build_atomically(Path(path), "tiny-stable-audio/1", _build)
