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

import json
import os
import random
import shutil
import threading
import uuid
from pathlib import Path

MARKER = ".omni-complete"
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
# Weight init draws from torch's process-global RNG: builders in threads take turns.
_RNG_LOCK = threading.Lock()
_SYLLABLES = (
    "ka ti ro ne su ma lo ve an el is or ut qu en th st ing er al pro gen "
    "com mod tok req que ue ser ver wor ker dif fu sion ima ge text"
).split()


def build_tiny_llama(path: Path) -> Path:
    """Build the tiny Llama at `path` unless a complete one is already there.

    Built in a temporary sibling directory and renamed into place, so readers never
    see a half-written checkpoint; when a concurrent builder wins the rename, its
    result is kept and ours is discarded.
    """
    path = Path(path)
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_checkpoint(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT_VERSION}))
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an incomplete or outdated `path` is moved aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, path)
            return
        except OSError:
            if _is_complete(path):
                return  # a concurrent builder won the race
            if path.exists():
                stale = path.parent / f".{path.name}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(path, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
    if not _is_complete(path):
        raise OSError(f"could not move tiny-llama into {path}")


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


def _build_tokenizer():
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
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    # Seeded in a forked RNG so the caller's global torch RNG is left untouched.
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            # Sharper logits (see module docstring); special tokens get logit 0, far
            # below the top ones, so generation runs to max_tokens unless a stop
            # string matches: "length" finishes are predictable.
            model.lm_head.weight.mul_(LOGIT_SCALE)
            model.lm_head.weight[[tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]] = 0
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
