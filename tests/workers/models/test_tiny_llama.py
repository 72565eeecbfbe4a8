"""The tiny Llama builder (`workers.models.tiny_llama`): deterministic, idempotent, safe
under concurrent builders, and a tokenizer with the chat template the engines use."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.models import build_tiny_model
from workers.models.atomic import MARKER
from workers.models.tiny_llama import build_tiny_llama


def digest(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file()
    }


def test_tiny_llama_is_deterministic_and_idempotent(tmp_path: Path, tiny_llama_dir: Path) -> None:
    built = build_tiny_model("tiny-llama", tmp_path / "a")
    assert (built / MARKER).exists()
    assert digest(built) == digest(tiny_llama_dir)  # same seeds, same bytes
    before = (built / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert build_tiny_llama(built) == built
    assert time.monotonic() - t0 < 0.1
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_llama_concurrent_builders(tmp_path: Path, tiny_llama_dir: Path) -> None:
    target = tmp_path / "race"
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: build_tiny_llama(target), range(4)))
    assert set(paths) == {target}
    assert digest(target) == digest(tiny_llama_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["race"]  # no temp dirs left


def test_tiny_llama_replaces_incomplete_dir(tmp_path: Path) -> None:
    target = tmp_path / "partial"
    target.mkdir()
    (target / "config.json").write_text("{}")
    build_tiny_llama(target)
    assert (target / MARKER).exists() and (target / "model.safetensors").exists()


def test_tiny_llama_tokenizer(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok("Hello world, 123!").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, 123!"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"
