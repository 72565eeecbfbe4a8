"""A tiny random-weight Llama checkpoint that transformers and vLLM both load.

No model hub is reachable from CI or dev machines, so the checkpoint is made here: a
byte-level BPE tokenizer trained on a generated corpus and a 2-layer Llama with fixed
seeds, written with `save_pretrained` like a real checkpoint. The head size is 32
because vLLM's CPU attention backend supports no smaller one.

Weights are drawn with a wider spread than Llama's default initializer so that
next-token logits are well separated: greedy decoding then does not flip between
near-tied tokens when batching changes the float rounding, which lets tests compare
batched against solo output exactly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from workers.models.atomic import build_atomically
from workers.models.building import seeded_torch, token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

FORMAT_VERSION = 1
SEED = 1234
VOCAB_SIZE = 2048
LOGIT_SCALE = 4.0
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SYLLABLES = (
    "ka ti ro ne su ma lo ve an el is or ut qu en th st ing er al pro gen "
    "com mod tok req que ue ser ver wor ker dif fu sion ima ge text"
).split()


def build_tiny_llama(path: Path) -> Path:
    """Build the tiny Llama at `path` unless a complete one is already there (atomically:
    see `workers.models.atomic`)."""
    return build_atomically(Path(path), f"tiny-llama/{FORMAT_VERSION}", _write_checkpoint)


def _corpus(n_lines: int = 3000) -> list[str]:
    """Deterministic pseudo-text: syllable words, digits and punctuation."""
    rng = random.Random(SEED)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(400)]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 16)
        toks = [rng.choice(words) for _ in range(n)]
        if rng.random() < 0.3:
            toks.insert(rng.randrange(n), str(rng.randint(0, 9999)))
        lines.append(" ".join(toks).capitalize() + rng.choice(".,!?:;"))
    return lines


def _build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Like Llama: encoding a text with special tokens prepends BOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=2048,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_checkpoint(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=False,
        dtype="float32",
        **token_ids(tokenizer),
    )
    with seeded_torch(SEED):
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            # Sharper logits (see module docstring); special tokens get logit 0, far
            # below the top ones, so generation runs to max_tokens unless a stop
            # string matches: "length" finishes are predictable.
            model.lm_head.weight.mul_(LOGIT_SCALE)
            model.lm_head.weight[[tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]] = 0
    model.generation_config = GenerationConfig(**token_ids(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
