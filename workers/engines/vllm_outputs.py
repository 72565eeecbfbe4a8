"""vLLM's request outputs as the engine contract's `TextOutput`: its choices, their
log-probabilities in OpenAI's shape, and the pieces of a streamed request.

A streamed request's outputs come after every step with only the new text and tokens
of one choice (DELTA); `Collected` hands each piece on and keeps them, so the final
output is the pieces joined, the same text a reader of the stream has seen.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from workers.engines.base import Choice, DeltaCallback, TextOutput

log = logging.getLogger(__name__)


class Collected:
    """The pieces of one streamed request so far, by choice index (the stepping
    thread's own)."""

    def __init__(self, on_delta: DeltaCallback, top_logprobs: int | None) -> None:
        self.on_delta = on_delta
        self.top_logprobs = top_logprobs
        self.text: dict[int, list[str]] = defaultdict(list)
        self.tokens: dict[int, int] = defaultdict(int)
        self.logprobs: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.finish: dict[int, str] = {}

    def add(self, out: Any) -> None:
        for completion in out.outputs:
            index = completion.index
            self.text[index].append(completion.text)
            self.tokens[index] += len(completion.token_ids)
            if self.top_logprobs is not None:
                self.logprobs[index] += logprob_entries(completion, self.top_logprobs)
            if completion.finish_reason:
                self.finish[index] = completion.finish_reason
            try:  # every step, even one whose text is held back: a piece per token
                self.on_delta(index, completion.text)
            except Exception:  # noqa: BLE001 - a reader's trouble never stops the engine
                log.warning("text stream callback failed", exc_info=True)

    def choices(self) -> list[Choice]:
        with_logprobs = self.top_logprobs is not None
        return [
            Choice(
                index=i,
                text="".join(self.text[i]),
                finish_reason=self.finish.get(i, "stop"),
                completion_tokens=self.tokens[i],
                logprobs=self.logprobs[i] if with_logprobs else None,
            )
            for i in sorted(self.text)
        ]


def final_output(
    out: Any, collected: Collected | None, lora: list[dict[str, Any]], top_logprobs: int | None
) -> TextOutput:
    """The `TextOutput` of a finished vLLM request (from its pieces when streamed);
    `top_logprobs`: the alternatives asked for per token, None without logprobs."""
    if collected is not None:
        choices = collected.choices()
    else:
        choices = [
            Choice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason or "stop",
                completion_tokens=len(c.token_ids),
                logprobs=None if top_logprobs is None else logprob_entries(c, top_logprobs),
            )
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
    return TextOutput.of(choices, len(out.prompt_token_ids or ()), lora)


def logprob_entries(completion: Any, top: int) -> list[dict[str, Any]]:
    """Per sampled token: {token, logprob, bytes, top_logprobs (the `top` likeliest)},
    as OpenAI's chat API gives them. vLLM gives the top ones and the sampled token, which
    may rank below them."""
    entries = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or (), strict=False):
        chosen = position.get(token_id)
        entry = _token(chosen.decoded_token if chosen else "", chosen.logprob if chosen else 0.0)
        ranked = sorted((lp for lp in position.values() if lp.rank and lp.rank <= top), key=_rank)
        entry["top_logprobs"] = [_token(lp.decoded_token, lp.logprob) for lp in ranked]
        entries.append(entry)
    return entries


def _rank(logprob: Any) -> int:
    return int(logprob.rank)


def _token(token: str | None, logprob: float) -> dict[str, Any]:
    text = token or ""
    return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}
