"""transformers text engine: one batching thread feeding `model.generate`.

The light alternative to vLLM (no KV-cache pool, no custom kernels, any model that
`AutoModelForCausalLM` loads). Caller threads queue requests and wait on a `Future`;
one thread gathers up to `max_batch_size` compatible requests into a left-padded batch
and runs `model.generate`. Batches are static: a request that arrives while a batch
runs waits for the next one (vLLM's continuous batching does better under load).

A per-row `StoppingCriteria` ends each row at its own `max_tokens` or stop string,
and ends rows early whose caller gave up (timeout) or when the engine shuts down, so
no compute is spent on answers nobody waits for. It also hands each row's token count to
the caller's `on_progress`, every `progress_interval_s`, and a streamed row's new text
to its `on_delta` after every step (`_RowText`).

Chat messages are rendered with the tokenizer's chat template to token ids on the
caller's thread (`workers.engines.chat`). `n` > 1, penalties and logprobs are refused
(`RequestValidationError` naming the field): `generate` has no equivalent of vLLM's.

Sampling settings are per batch in `generate`, so requests are grouped:
- greedy (`temperature == 0`) requests batch together, whatever their other settings;
- unseeded sampling requests batch with others of equal temperature and top_p;
- seeded sampling requests run alone, with the torch RNG seeded inside a forked RNG
  state, so the same seed and prompt give the same text on this engine (the text
  differs from vLLM's for the same seed: the RNGs differ).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from omni_tasks.errors import (
    EngineStoppedError,
    ProcessingError,
    RequestTimeoutError,
    RequestValidationError,
)
from workers.engines.background import OneModelEngine, notify_progress, settle
from workers.engines.base import Choice, DeltaCallback, TextOutput, TextParams, TextPrompt
from workers.engines.chat import render_chat
from workers.lora.peft_text import PeftAdapters
from workers.lora.text import PreparedAdapter
from workers.progress import ProgressCallback

log = logging.getLogger(__name__)


@dataclass
class _Request:
    rid: str
    prompt: str | list[int]  # a prompt, or rendered chat token ids
    params: TextParams
    deadline: float
    on_progress: ProgressCallback | None = None
    future: Future = field(default_factory=Future)
    adapter: PreparedAdapter | None = None  # its LoRA adapters as one (workers.lora)
    on_delta: DeltaCallback | None = None
    sent: str = ""  # the text handed to `on_delta` so far

    @property
    def group(self) -> tuple:
        p = self.params
        if p.temperature == 0:
            return ("greedy",)
        if p.seed is not None:
            return ("seeded", id(self))  # alone
        return ("sample", p.temperature, p.top_p)


class _RowStop:
    """Per-row stopping: own max_tokens, stop strings, caller gone, engine stopping."""

    def __init__(self, engine: TransformersTextEngine, batch: list[_Request], prompt_len: int):
        self.engine = engine
        self.batch = batch
        self.prompt_len = prompt_len
        self.ends: list[int | None] = [None] * len(batch)  # new-token count when stopped
        self.next_progress = 0.0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        stopping = self.engine._stopping
        now = time.monotonic()
        if now >= self.next_progress:
            self.next_progress = now + self.engine.progress_interval_s
            self._report(n_new)
        done = []
        for i, req in enumerate(self.batch):
            if self.ends[i] is None:
                if req.on_delta is not None:
                    self._stream(req, input_ids[i])
                if n_new >= req.params.max_tokens or self._hit_stop(req, input_ids[i]):
                    self.ends[i] = n_new
                elif stopping or req.future.done() or now > req.deadline:
                    self.ends[i] = -1  # abandoned: nobody reads this row
            done.append(self.ends[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _stream(self, req: _Request, row: Any) -> None:
        """Hand on the row's new text, less what may still change: a character whose
        bytes are not all out yet, and the length of a stop string that may be forming
        (the final text is cut before it)."""
        text = self.engine.tokenizer.decode(row[self.prompt_len :], skip_special_tokens=True)
        safe = len(text.rstrip("\ufffd")) - max((len(s) - 1 for s in req.params.stop), default=0)
        cuts = [k for k in (text.find(s) for s in req.params.stop) if k >= 0]
        safe = min([safe, *cuts])
        if safe > len(req.sent) and text.startswith(req.sent):
            send_delta(req, text[:safe])

    def _report(self, n_new: int) -> None:
        for req, end in zip(self.batch, self.ends, strict=True):
            if end is None and req.on_progress is not None:
                tokens = min(n_new, req.params.max_tokens)
                notify_progress(
                    req.on_progress, {"tokens": tokens, "max_tokens": req.params.max_tokens}
                )

    def _hit_stop(self, req: _Request, row: Any) -> bool:
        if not req.params.stop:
            return False
        text = self.engine.tokenizer.decode(row[self.prompt_len :], skip_special_tokens=True)
        return any(s in text for s in req.params.stop)


#: Why `n` > 1, penalties and logprobs are refused here.
UNSUPPORTED = "the transformers engine cannot honour it: leave it out, or use ar.engine: vllm"


def send_delta(req: _Request, text: str) -> None:
    """Hand `req` the part of `text` it has not had; a failing callback is logged."""
    piece, req.sent = text[len(req.sent) :], text
    if req.on_delta is not None and piece:
        try:
            req.on_delta(0, piece)
        except Exception:  # noqa: BLE001 - a reader's trouble never stops the engine
            log.warning("text stream callback failed", exc_info=True)


def finish_stream(req: _Request, text: str) -> None:
    """The rest of the final text; it extends what was streamed, which held back what
    could still change."""
    if text.startswith(req.sent):
        send_delta(req, text)
    else:
        log.warning("%s: streamed text is not a prefix of the final text", req.rid)


class TransformersTextEngine(OneModelEngine):
    """A transformers causal LM shared by every thread of one worker process."""

    name = "transformers"
    label = "transformers engine"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        batch_wait_s: float = 0.005,
        adapters: PeftAdapters | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`adapters`: per-request LoRA adapters through PEFT; None: LoRA off.
        `chat_template`: replaces the tokenizer's own for chat requests."""
        self.device = device = self.pick_device(device)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._adapters = adapters
        self.chat_template = chat_template
        # Loaded on the batching thread: see workers.engines.background.
        self._start_thread(self._run, "hf-batcher", build=lambda: self._load(model, dtype))
        log.info("transformers engine for %s on %s ready in %.1f s", model, device, self.init_s)

    def _load(self, model: str, dtype: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = self.torch_dtype(dtype)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        self.model.to(self.device).eval()
        if self._adapters is not None:
            self._adapters.base = self.model
        self.init_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ callers

    #: Seconds between two progress reports of a running batch.
    progress_interval_s = 0.1

    def generate(
        self,
        request_id: str,
        prompt: TextPrompt,
        params: TextParams,
        timeout_s: float,
        *,
        on_progress: ProgressCallback | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> TextOutput:
        """Queue the request, block until it finishes; see `TextEngine.generate`."""
        self._check_process()
        if params.max_tokens < 1:
            raise ProcessingError("max_tokens must be at least 1")
        if params.lora and self._adapters is None:
            raise ProcessingError("LoRA is off on this worker: its config registers no adapters")
        unsupported = params.unsupported()
        if unsupported:
            raise RequestValidationError(unsupported, UNSUPPORTED)
        if not isinstance(prompt, str):
            prompt = render_chat(self.tokenizer, prompt, self.chat_template)
        req = _Request(f"{request_id}#{next(self._ids)}", prompt, params, 0.0, on_progress)
        req.on_delta = on_delta
        req.adapter = self._adapters.prepare(params.lora) if self._adapters else None
        req.deadline = time.monotonic() + timeout_s
        with self._cond:
            self._raise_if_unavailable()
            self._queue.append(req)
            self._cond.notify()
        try:
            return req.future.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout:
            # Settling the future is the cancel signal: the batcher skips or ends the row.
            settle(req.future, exc=RequestTimeoutError(f"request {request_id} timed out"))
            return self._result_or_timeout(req, request_id, timeout_s)

    @staticmethod
    def _result_or_timeout(req: _Request, request_id: str, timeout_s: float) -> TextOutput:
        exc = req.future.exception()
        if exc is None:
            return req.future.result()  # finished in the same instant
        if isinstance(exc, RequestTimeoutError):
            raise RequestTimeoutError(
                f"request {request_id} exceeded its timeout of {timeout_s:g} s"
            ) from None
        raise exc

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail queued and running requests with EngineStoppedError, stop, free the model.

        Callers are released at once; the running batch ends after its current forward
        pass. Waits up to `timeout_s` for that (0: return at once). Idempotent.
        """
        with self._cond:
            self._stopping = True
            reqs = list(self._queue) + list(self._running)
            self._queue.clear()
            self._cond.notify_all()
        for req in reqs:
            settle(req.future, exc=EngineStoppedError("transformers engine shut down"))
        self._join_thread(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if not batch:
                    continue
                try:
                    results = self._generate_batch(batch)
                except Exception as exc:  # noqa: BLE001 - reported to every waiter
                    log.exception("transformers generate failed for %d requests", len(batch))
                    for req in batch:
                        err = ProcessingError(f"transformers generate failed: {exc!r}")
                        err.__cause__ = exc
                        settle(req.future, exc=err)
                else:
                    for req, out in zip(batch, results, strict=True):
                        if out is None:
                            settle(req.future, exc=RequestTimeoutError(f"{req.rid} timed out"))
                        else:
                            settle(req.future, out)
                finally:
                    with self._cond:
                        self._running = []
        except BaseException as exc:
            self._broken = exc
            log.exception("transformers batching thread died; engine is broken")
            with self._cond:
                reqs = list(self._queue) + list(self._running)
                self._queue.clear()
            for req in reqs:
                settle(req.future, exc=ProcessingError(f"transformers engine broke: {exc!r}"))
        finally:
            self._close()

    def _next_batch(self) -> list[_Request] | None:
        """Wait for work; return compatible live requests, led by the most urgent one
        (None once stopping)."""
        with self._cond:
            while not (self._stopping or self._queue):
                self._cond.wait()
            if self._stopping:
                return None
        if self.batch_wait_s > 0 and len(self._queue) < self.max_batch_size:
            time.sleep(self.batch_wait_s)  # let concurrent callers join this batch
        with self._cond:
            if self._stopping:
                return None
            # The most urgent class first (arrival order within a class).
            waiting = deque(sorted(self._queue, key=lambda r: r.params.rank))
            first = waiting.popleft()
            batch, rest = [first], deque()
            while waiting:
                req = waiting.popleft()
                fits = len(batch) < self.max_batch_size and self._adapters_fit(batch, req)
                if fits and req.group == first.group:
                    batch.append(req)
                else:
                    rest.append(req)
            self._queue = rest
            batch = [r for r in batch if not r.future.done()]
            self._running = batch
            return batch

    def _adapters_fit(self, batch: list[_Request], req: _Request) -> bool:
        """At most `lora.max_loras` adapters in one batch."""
        if self._adapters is None or req.adapter is None:
            return True
        names = {r.adapter.name for r in batch if r.adapter is not None} | {req.adapter.name}
        return len(names) <= self._adapters.config.lora.max_loras

    def _generate_batch(self, batch: list[_Request]) -> list[TextOutput | None]:
        if self._adapters is None:
            return self._generate_rows(batch, self.model, {}, [[] for _ in batch])
        deadline = max(r.deadline for r in batch)
        extra, uses, names = self._adapters.acquire([r.adapter for r in batch], deadline)
        try:
            return self._generate_rows(batch, self._adapters.model(), extra, uses)
        finally:
            self._adapters.cache.release(names)

    def _generate_rows(
        self, batch: list[_Request], model: Any, extra: dict[str, Any], uses: list[list[dict]]
    ) -> list[TextOutput | None]:
        import torch

        tok = self.tokenizer
        rows = [
            r.prompt if isinstance(r.prompt, list) else tok(r.prompt)["input_ids"] for r in batch
        ]
        enc = tok.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        stop = _RowStop(self, batch, prompt_len)
        first = batch[0].params
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.params.max_tokens for r in batch),
            "stopping_criteria": [stop],
            "pad_token_id": tok.pad_token_id,
        }
        if first.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
            kwargs["top_k"] = 0  # like vLLM: no top-k unless asked (TextParams has none)
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            if first.temperature != 0 and first.seed is not None:
                torch.manual_seed(first.seed)
            out = model.generate(**enc, **kwargs, **extra)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        eos = self._eos_ids()
        results: list[TextOutput | None] = []
        for i, req in enumerate(batch):
            end = stop.ends[i]
            if end == -1 or req.future.done():
                results.append(None)
                continue
            new = out[i, prompt_len:].tolist()
            new = new[: end if end is not None else len(new)]
            reason = "length" if len(new) >= req.params.max_tokens else "stop"
            for j, t in enumerate(new):
                if t in eos:
                    new, reason = new[: j + 1], "stop"
                    break
            text = tok.decode(new, skip_special_tokens=True)
            cut = min((k for k in (text.find(s) for s in req.params.stop) if k >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if req.on_delta is not None:
                finish_stream(req, text)
            choice = Choice(0, text, reason, len(new))
            results.append(TextOutput.of([choice], int(prompt_tokens[i]), uses[i]))
        return results

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
