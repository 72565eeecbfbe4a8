"""A tiny random-weight VITS text-to-speech checkpoint, loaded like MMS-TTS.

`VitsModel.from_pretrained(path)` and `VitsTokenizer.from_pretrained(path)` (or
`AutoTokenizer`) load it exactly as they load facebook/mms-tts-eng: a character vocabulary
whose id 0 is the blank put between characters (`add_blank`) and the padding token,
`normalize` (lowercase, drop characters outside the vocabulary), no phonemizer, no uroman.

The model is the real `VitsModel` with small sizes: a 2-layer text encoder, a 2-flow prior
and a narrow HiFi-GAN decoder with MMS's upsampling (8 x 8 x 2 x 2 = 256 samples a frame
at 16 kHz). It has four speakers (so requests have voices to choose) and no dropout.
Weights come from a fixed seed, so builds are identical. Its speech is noise: it exists to
run the real loading, batching and encoding paths.

Durations are fixed: random weights made a sentence last anywhere from 2 to 10 s (and
cost as much to make), so the duration predictor is the deterministic one (MMS uses the
stochastic one) with its output set to `FRAMES_PER_TOKEN` for every token. A character
(with its blank) lasts 4 frames, 64 ms, about the pace of speech; the length of a text's
audio is known in advance (tokens x 2 x 256 samples at speed 1), and `speaking_rate`
divides it. The prior still samples noise, so seeds matter.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any

from workers.models.atomic import build_atomically
from workers.models.building import seeded_torch

FORMAT_VERSION = 2
SEED = 4321
SAMPLING_RATE = 16_000
#: Every token's duration before `ceil` (so 2 frames at speed 1, 1 at speed 2, 4 at 0.5).
FRAMES_PER_TOKEN = 1.9
NUM_SPEAKERS = 4
#: The blank between characters and the padding token: id 0, as in MMS-TTS vocabularies.
BLANK = "_"
UNKNOWN = "<unk>"
#: Id 0 first; what `normalize` keeps of a text (after lowercasing). The unknown token is in
#: it so that the embedding covers every id the tokenizer can give (a text may spell it).
VOCAB = (BLANK, " ", *string.ascii_lowercase, *string.digits, *".,!?;:'\"-()", UNKNOWN)
#: Small sizes (MMS-TTS: hidden 192, 6 layers, 513 bins, decoder 512 channels).
_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "ffn_dim": 64,
    "flow_size": 16,
    "spectrogram_bins": 33,
    "upsample_initial_channel": 32,
    "upsample_rates": [8, 8, 2, 2],
    "upsample_kernel_sizes": [16, 16, 4, 4],
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]],
    "duration_predictor_filter_channels": 32,
    "duration_predictor_num_flows": 2,
    "prior_encoder_num_flows": 2,
    "prior_encoder_num_wavenet_layers": 2,
    "posterior_encoder_num_wavenet_layers": 2,
    "speaker_embedding_size": 8,
    "use_stochastic_duration_prediction": False,
}
_NO_DROPOUT = {
    name: 0.0
    for name in (
        "layerdrop",
        "hidden_dropout",
        "attention_dropout",
        "activation_dropout",
        "duration_predictor_dropout",
        "wavenet_dropout",
    )
}


def build_tiny_tts(path: Path) -> Path:
    """Build the tiny VITS at `path` unless a complete one is already there (atomically:
    see `workers.models.atomic`)."""
    return build_atomically(Path(path), f"tiny-tts/{FORMAT_VERSION}", _write_checkpoint)


def _write_tokenizer(out: Path) -> Any:
    """Write the vocabulary and load the tokenizer from it, as MMS-TTS's is configured."""
    from transformers import VitsTokenizer

    vocab_file = out / "vocab.json"
    vocab_file.write_text(json.dumps({c: i for i, c in enumerate(VOCAB)}, indent=2) + "\n")
    return VitsTokenizer(
        vocab_file=str(vocab_file),
        pad_token=BLANK,
        unk_token=UNKNOWN,
        language="eng",
        add_blank=True,
        normalize=True,
        phonemize=False,
        is_uroman=False,
    )


def _write_checkpoint(out: Path) -> None:
    import torch
    from transformers import VitsConfig, VitsModel

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(out)
    config = VitsConfig(
        vocab_size=len(VOCAB),
        num_speakers=NUM_SPEAKERS,
        sampling_rate=SAMPLING_RATE,
        pad_token_id=tokenizer.pad_token_id,
        **_SIZES,
        **_NO_DROPOUT,
    )
    with seeded_torch(SEED):
        model = VitsModel(config).eval()
    with torch.no_grad():  # fixed durations: see the module docstring
        model.duration_predictor.proj.weight.zero_()
        model.duration_predictor.proj.bias.fill_(math.log(FRAMES_PER_TOKEN))
    _save_quietly(model, out)
    tokenizer.save_pretrained(out)


def _save_quietly(model: Any, out: Path) -> None:
    """`model.save_pretrained(out)` without transformers' "Writing model shards" bar."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
