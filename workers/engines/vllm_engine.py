"""vLLM text engine: one in-process `LLMEngine` stepped by one background thread.

Why this design rather than `AsyncLLM` (measured on the 2-core CPU box, tiny Llama,
32 threads x 128 new tokens): the synchronous `LLMEngine` with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` and the "uni" executor runs wholly inside the worker
process. It started in ~2 s (eager) against 9-30 s, gave 4,500-7,200 tok/s against
1,400-5,500, and shut down in ~1 s with no child process to reap, where `AsyncLLM`
always spawns an engine-core child (the Celery worker then hangs on SIGTERM unless it
is closed explicitly) and logged an EngineDeadError on shutdown.

Threading model: caller threads never touch the vLLM engine (it is not thread-safe).
They queue "add"/"abort" commands and wait on a per-request `Future`; the stepping
thread applies the commands between `step()` calls, which gives continuous batching:
a request that arrives mid-generation joins the next step. An idle engine first waits
for the rest of a burst (`burst_gap_s` between arrivals, up to `burst_max_s` or a full
batch): a Celery worker hands a burst over at ~2-4 ms a message, and stepping at once ran
~30 small-batch steps at 7.7 ms each (2.4 ms unhindered), GIL-bound against that intake
and slowing it. P3 (32 x 128 tokens through the queue): 6.4-6.6k tok/s without, 6.7-7.0k with.

Outputs come only when a request finishes (FINAL_ONLY), except for a streamed request
(`on_delta`), whose new text vLLM hands over after each step (DELTA); the pieces are
collected into its final output, so the streamed text and the result are the same
text. `on_progress` callers get token counts read between steps. Chat messages are
rendered with the tokenizer's chat template (`workers.engines.chat`) on the caller's
thread and go to vLLM as token ids. On a CPU the model gets all CPUs but one
(`cpu_threads`).

One engine per process: vLLM keeps its parallel groups in process globals, and closing
one engine breaks any other in the same process, so a second live engine is refused.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from omni_tasks.errors import EngineStoppedError, ProcessingError, RequestTimeoutError
from workers.engines.background import (
    BackgroundThreadEngine,
    notify_progress,
    set_cpu_threads,
    settle,
    wait_for_burst,
)
from workers.engines.base import DeltaCallback, TextOutput, TextParams, TextPrompt
from workers.engines.chat import render_chat
from workers.engines.vllm_outputs import Collected, final_output
from workers.lora.text import PreparedAdapter, VllmAdapters
from workers.progress import ProgressCallback

log = logging.getLogger(__name__)

#: Consecutive failed `step()` calls after which the engine is declared broken.
MAX_STEP_FAILURES = 3

# The one live engine of this process (see the module docstring).
_live: VllmTextEngine | None = None
_live_lock = threading.Lock()


class VllmTextEngine(BackgroundThreadEngine):
    """A vLLM engine shared by every thread of one worker process (see module doc)."""

    name = "vllm"
    label = "vLLM engine"
    #: Seconds between two readings of the watched requests' token counts.
    progress_interval_s = 0.1
    #: An idle engine's wait for the rest of a burst (see the module docstring).
    burst_gap_s = 0.01
    burst_max_s = 0.1

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        max_num_seqs: int = 32,
        gpu_memory_utilization: float = 0.8,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool | None = None,
        cpu_threads: int | None = None,
        adapters: VllmAdapters | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`adapters`: per-request LoRA adapters (`workers.lora.text`); None: LoRA off.
        `chat_template`: replaces the tokenizer's own for chat requests."""
        global _live
        with _live_lock:
            if _live is not None:
                raise ProcessingError("a VllmTextEngine already runs in this process")
            _live = self
        self.model = str(model)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self._engine: Any = None
        self._tokenizer: Any = None
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, str, Any]] = deque()  # (op, internal id, payload)
        self._futures: dict[str, Future] = {}  # internal id -> caller's future
        self._active: set[str] = set()  # ids added to vLLM, owned by the stepping thread
        # Owned by the stepping thread: iid -> (vLLM's internal id, callback, max_tokens).
        self._watched: dict[str, tuple[str, ProgressCallback, int]] = {}
        self._next_progress = 0.0
        self._ids = itertools.count()
        self._adapters = adapters
        self._lora_uses: dict[str, list[dict[str, Any]]] = {}  # iid -> its adapters' uses
        self._streamed: dict[str, Collected] = {}  # iid -> its pieces so far (stepper's)
        self._top_logprobs: dict[str, int] = {}  # iid -> alternatives asked for per token
        self.chat_template = chat_template

        build = functools.partial(  # run by the stepping thread: see engines.background
            self._build,
            str(model),
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager,
            cpu_threads=cpu_threads,
        )
        try:
            self._start_thread(self._run, "vllm-stepper", build=build)
        except BaseException:
            with _live_lock:
                _live = None
            raise
        log.info("vLLM engine for %s ready in %.1f s", model, self.init_s)

    def _build(
        self,
        model: str,
        *,
        dtype: str,
        max_model_len: int,
        max_num_seqs: int,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        kv_cache_gib: float,
        enforce_eager: bool | None,
        cpu_threads: int | None,
    ) -> None:
        # Set before vLLM reads them; vLLM freezes its env cache when an engine
        # starts, so it is unfrozen below for a later engine in the same process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kv_bytes = int(kv_cache_gib * 2**30)
        if float(kv_cache_gib).is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        else:
            # The variable takes whole GiB only and would override the exact size.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        import vllm.envs
        from vllm import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        vllm.envs.disable_envs_cache()
        self.is_cpu = current_platform.is_cpu()
        if self.is_cpu:  # before vLLM replaces torch.set_num_threads with a no-op
            set_cpu_threads(cpu_threads)
        if enforce_eager is None:
            # CPU: torch.compile gave ~1.3x tok/s but 11 s init (31 s on a cold compile
            # cache) against ~2 s; GPUs keep vLLM's default (compiled + CUDA graphs).
            enforce_eager = self.is_cpu
        args = EngineArgs(
            model=str(model),
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else None,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
            # The request's class orders vLLM's waiting queue (and its preemptions).
            scheduling_policy="priority",
            **(self._adapters.engine_args(self.is_cpu) if self._adapters else {}),
            **(
                {"kv_cache_memory_bytes": kv_bytes}
                if self.is_cpu
                else {"gpu_memory_utilization": gpu_memory_utilization}
            ),
        )
        t0 = time.perf_counter()
        self._engine = LLMEngine.from_engine_args(args)
        self._tokenizer = self._engine.get_tokenizer()  # for chat, on callers' threads
        self.init_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ callers

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
        sampling = self._sampling_params(params, streamed=on_delta is not None)
        prepared = self._prepare_adapters(params)
        if not isinstance(prompt, str):  # chat messages: token ids, as vLLM's chat path
            ids = render_chat(self._tokenizer, prompt, self.chat_template)
            prompt = {"prompt_token_ids": ids}  # type: ignore[assignment]
        # vLLM keys outputs by the id given to add_request; a counter keeps ids unique
        # when a redelivered task reuses its id while the first run still goes on.
        iid = f"{request_id}#{next(self._ids)}"
        fut: Future = Future()
        with self._cond:
            self._raise_if_unavailable()
            self._futures[iid] = fut
            payload = (prompt, sampling, params.rank, on_progress, on_delta, prepared)
            self._inbox.append(("add", iid, payload))
            self._cond.notify()
        try:
            return fut.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout:
            with self._cond:
                self._futures.pop(iid, None)
                self._inbox.append(("abort", iid, None))
                self._cond.notify()
            if fut.done():
                return fut.result()  # settled in the same instant (result or error)
            raise RequestTimeoutError(
                f"request {request_id} exceeded its timeout of {timeout_s:g} s"
            ) from None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Fail in-flight requests with EngineStoppedError, stop the stepper, free vLLM.

        Callers are released at once; then this waits up to `timeout_s` for the stepping
        thread to finish its step and close vLLM. `timeout_s=0` returns at once (for a
        signal handler): the thread closes vLLM itself and the atexit hook waits for it.
        Idempotent.
        """
        with self._cond:
            self._stopping = True
            futures = list(self._futures.values())
            self._futures.clear()
            self._cond.notify_all()
        for fut in futures:  # callers wake now, not after the current step
            settle(fut, exc=EngineStoppedError("vLLM engine shut down"))
        self._join_thread(timeout_s)

    def _prepare_adapters(self, params: TextParams) -> PreparedAdapter | None:
        if params.lora and self._adapters is None:
            raise ProcessingError("LoRA is off on this worker: its config registers no adapters")
        return self._adapters.prepare(params.lora) if self._adapters else None

    def _sampling_params(self, params: TextParams, streamed: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Per-step outputs only for a streamed request: each costs detokenizing work.
        kind = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(
                n=params.n,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=list(params.stop) or None,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                logprobs=params.logprobs,
                output_kind=kind,
            )
        except Exception as exc:  # ValueError or vLLM's own VLLMValidationError
            raise ProcessingError(f"invalid sampling parameters: {exc}") from exc

    # ---------------------------------------------------------- stepping thread

    def _run(self) -> None:
        try:
            failures = 0
            while True:
                with self._cond:
                    while not (self._stopping or self._inbox or self._active):
                        self._cond.wait()
                    if not self._active:  # idle: let the rest of a burst arrive
                        wait_for_burst(
                            self._cond, self._arrivals, self.burst_gap_s, self.burst_max_s
                        )
                    if self._stopping:
                        return
                    ops = list(self._inbox)
                    self._inbox.clear()
                for op, iid, payload in ops:
                    self._apply(op, iid, payload)
                if not self._active:
                    continue
                try:
                    outputs = self._engine.step()
                except Exception as exc:  # noqa: BLE001 - reported to every waiter
                    failures += 1
                    log.exception("vLLM step failed (%d in a row)", failures)
                    self._fail_active(exc)
                    if failures >= MAX_STEP_FAILURES:
                        raise
                    continue
                failures = 0
                for out in outputs:
                    collected = self._streamed.get(out.request_id)
                    if collected is not None:
                        collected.add(out)
                    if out.finished:
                        self._finish(out)
                if self._watched:
                    self._report_progress()
                if not outputs and not self._engine.has_unfinished_requests():
                    # Never expected; guards against spinning on requests vLLM dropped.
                    self._fail_active(RuntimeError("vLLM dropped the request"))
        except BaseException as exc:
            self._broken = exc
            log.exception("vLLM stepping thread died; engine is broken")
            self._fail_active(exc)
        finally:
            self._close()

    def _apply(self, op: str, iid: str, payload: Any) -> None:
        if op == "abort":
            self._watched.pop(iid, None)
            self._lora_uses.pop(iid, None)
            self._streamed.pop(iid, None)
            self._top_logprobs.pop(iid, None)
            if iid in self._active:
                self._active.discard(iid)
                try:
                    self._engine.abort_request([iid])
                except Exception:  # noqa: BLE001 - a failed abort must not stop the loop
                    log.warning("could not abort vLLM request %s", iid, exc_info=True)
            return
        with self._cond:
            fut = self._futures.get(iid)
        if fut is None or fut.done():
            return  # timed out or shut down before it was added
        prompt, sampling, rank, on_progress, on_delta, prepared = payload
        try:
            lora, uses = (None, [])
            if self._adapters is not None:  # loads the adapter if vLLM has not got it
                lora, uses = self._adapters.request_for(self._engine, prepared)
            internal = self._engine.add_request(
                iid, prompt, sampling, priority=rank, lora_request=lora
            )
        except Exception as exc:  # noqa: BLE001 - e.g. prompt longer than max_model_len
            self._pop_and_settle(iid, exc=ProcessingError(f"vLLM rejected the request: {exc}"))
            return
        self._lora_uses[iid] = uses
        self._active.add(iid)
        if sampling.logprobs is not None:
            self._top_logprobs[iid] = sampling.logprobs
        if on_delta is not None:
            self._streamed[iid] = Collected(on_delta, sampling.logprobs)
        if on_progress is not None:
            self._watched[iid] = (internal, on_progress, sampling.max_tokens)

    def _arrivals(self) -> int | None:
        """Requests queued for the next step, None once the batch is full or stopping."""
        n = len(self._inbox)
        return None if n >= self.max_num_seqs or self._stopping else n

    def _report_progress(self) -> None:
        """Hand each watched request its token count, read from vLLM's output processor
        (a dict lookup, nothing per token), every `progress_interval_s`."""
        now = time.monotonic()
        if now < self._next_progress:
            return
        self._next_progress = now + self.progress_interval_s
        try:
            states = self._engine.output_processor.request_states
            for internal, cb, total in self._watched.values():
                if internal in states:  # (notify_progress never raises)
                    tokens = states[internal].detokenizer.num_output_tokens()
                    notify_progress(cb, {"tokens": tokens, "max_tokens": total})
        except Exception:  # noqa: BLE001 - vLLM internals moved: progress is advisory
            log.warning("cannot read vLLM token counts; progress off", exc_info=True)
            self._watched.clear()

    def _finish(self, out: Any) -> None:
        iid = out.request_id
        self._active.discard(iid)
        self._watched.pop(iid, None)
        top = self._top_logprobs.pop(iid, None)
        collected, lora = self._streamed.pop(iid, None), self._lora_uses.get(iid, [])
        result = final_output(out, collected, lora, top)
        self._pop_and_settle(iid, result=result)

    def _pop_and_settle(self, iid: str, result: Any = None, exc: BaseException | None = None):
        self._lora_uses.pop(iid, None)
        with self._cond:
            fut = self._futures.pop(iid, None)
        if fut is not None:
            settle(fut, result, exc)

    def _fail_active(self, cause: BaseException) -> None:
        """Hand a step failure to every running request and drop them from vLLM."""
        ids, self._active = list(self._active), set()
        self._watched.clear()
        self._streamed.clear()
        self._top_logprobs.clear()
        for iid in ids:
            err = ProcessingError(f"vLLM engine step failed: {cause!r}")
            err.__cause__ = cause
            self._pop_and_settle(iid, exc=err)
        try:
            self._engine.abort_request(ids)
        except Exception:  # noqa: BLE001 - the engine may be unusable already
            log.debug("abort after a failed step failed too", exc_info=True)

    def _close(self) -> None:
        """Abort what vLLM still holds and release the model and KV cache."""
        with self._cond:
            self._stopping = True
            futures = list(self._futures.values())
            self._futures.clear()
        for fut in futures:
            if self._broken is not None:
                settle(fut, exc=ProcessingError(f"vLLM engine is broken: {self._broken!r}"))
            else:
                settle(fut, exc=EngineStoppedError("vLLM engine stopped"))
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            if self._active:
                engine.abort_request(list(self._active))
            self._active.clear()
            engine.engine_core.shutdown()  # frees KV cache, tears down torch.distributed
        except Exception:  # noqa: BLE001 - best effort while stopping
            log.warning("error while closing the vLLM engine", exc_info=True)
        del engine
        global _live
        with _live_lock:
            if _live is self:
                _live = None
        if not self.is_cpu:
            import torch

            torch.cuda.empty_cache()
