"""The configuration reference, `docs/configuration.md`, generated from the schema.

`render()` walks the config dataclasses (`schema`, `pools`) with `dataclasses.fields`: each field's
dotted name, type, default and environment variable, and a one-line description from
`FIELD_DOCS`. A field without a description stops the rendering, so a new field cannot
reach the page undocumented; `tests/config/test_config_reference.py` keeps the page
equal to `render()`. Run `python -m omni_tasks.config.reference` to write the page.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from omni_tasks.config.loading import RENAMED_KEYS
from omni_tasks.config.registry import ModelEntry
from omni_tasks.config.schema import CoreModuleConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

#: One line per field, by its dotted name (`models.<name>.path` for registry entries):
#: "name: text", continued on lines indented by four spaces.
FIELD_DOCS_TEXT = """\
scheduler.scheduler_type: The policy that picks a request's queue and level at the producer
    and orders a worker's held requests: `fifo`, `priority`, `multimodal`, `diffusion`,
    `hybrid`.
scheduler.max_queue_size: Requests each pool admits and has not finished; over it a send
    raises `QueueFullError` (HTTP 429).
scheduler.priority_weights: Weight of each priority class (`high`, `normal`, `low`): spreads
    the classes over the levels and gives each its rank.
scheduler.timeout_seconds: The longest a request may take from its creation (caps
    `timeout_s`, with `request_timeout`).
scheduler.batch_size: Caps the sequences a vLLM engine runs at once and a denoising step's
    batch (with `diffusion.max_batch_size`).
scheduler.enable_preemption: A diffusion worker pauses a lower-ranked running request at a
    step boundary for a higher-ranked held one.
scheduler.starvation_s: A request a diffusion worker has held this long ranks above every
    request held for less.
cache.max_memory_gib: Device memory of each diffusion worker's DiT cache, in GiB
    (`cache.max_memory_gb` is read too).
cache.strategy: Eviction policy of the DiT cache: `lru`, `lfu`, `ttl`, `adaptive` (ARC,
    counted in bytes).
cache.ttl_seconds: An entry's lifetime under the `ttl` strategy, from insertion.
cache.enable_compression: Store prompt embeddings compressed (fp16, int8 or int4 with
    per-channel scales).
cache.compression_ratio: The most bytes a compressed entry may keep, as a share of the
    original (0, 1].
max_memory_gib: A CPU worker's device memory budget in GiB, at most `max_cpu_utilization` of
    system memory (`max_memory_gb` is read too).
max_gpu_utilization: Share of a CUDA device's memory a worker may use (also vLLM's
    `gpu_memory_utilization`).
max_cpu_utilization: Share of the system memory a CPU worker's budget may take.
request_timeout: The longest a request may take from its creation (caps `timeout_s`, with
    `scheduler.timeout_seconds`).
worker_timeout: Seconds without a heartbeat after which a worker no longer counts as live
    (health names it).
cleanup_interval: Seconds between `OmniScheduler.start()`'s cleanups of finished requests.
enable_metrics: `OmniScheduler.start()` samples the counters every `metrics_interval`.
metrics_interval: Seconds between counter samples; the recent window of metrics and health
    is 6 of them.
enable_health_checks: `OmniScheduler.start()` checks health every `metrics_interval` and
    logs new issues.
redis_url: Redis for results, coordination and (unless `broker_url`) the queues: `redis://`,
    `rediss://` (TLS), `unix://`, `sentinel://`.
broker_url: The Celery broker when it is not `redis_url` (`amqp://` for RabbitMQ); empty:
    `redis_url`.
redis_sentinel_master: The Sentinel master's name, where `redis_url` or `broker_url` names
    Sentinels.
key_prefix: Prefix of every omni-tasks Redis key (no `:`).
models_dir: Where models, LoRA folders and the tiny models live (`~` expanded).
output_dir: Where workers write images, videos and audio; the HTTP API reads them here.
max_redeliveries: Returns of one message before it is refused, recorded and its task failed.
result_expires: Seconds results, job records, request ids and idempotency keys are kept.
reaper_interval_s: How often live workers give back a dead worker's messages and publish
    lost requests again.
ledger_grace_s: How long an accepted request may be nowhere (not queued, held or done)
    before it is published again.
progress_first_after_s: A running request's first `PROGRESS` write comes after this long.
progress_interval_s: At most one `PROGRESS` write per this many seconds after the first.
ar.queue: The AR pool's queue (its priority lists are `<queue>\\x06\\x16<level>`).
ar.pool_type: Celery's execution pool (`--pool`) of each AR worker: `threads`, `solo`,
    `prefork`.
ar.concurrency: Requests one AR worker runs at once (Celery's `--concurrency`), batched by
    its engine.
ar.prefetch_multiplier: Messages a worker reserves per slot (Celery's
    `worker_prefetch_multiplier`).
ar.engine: `vllm` (continuous batching) or `transformers` (batched HF `generate`).
ar.model: The AR model: a folder under `models_dir`, a path, or a hub id.
ar.dtype: The model's load dtype (`auto`, `float32`, `bfloat16`, ...).
ar.max_model_len: vLLM's context length (prompt plus generated tokens).
ar.tensor_parallel_size: GPUs vLLM shards the model over.
ar.kv_cache_gib: vLLM's KV cache on a CPU, in GiB (`VLLM_CPU_KVCACHE_SPACE`).
ar.max_batch_size: Sequences one `generate` call runs (transformers engine only).
ar.chat_template: A chat template (Jinja text or a file) for a model without one, or to
    replace its own.
diffusion.queue: The diffusion pool's queue; each model also has `<queue>.<model>`.
diffusion.pool_type: Celery's execution pool (`--pool`) of each diffusion worker.
diffusion.concurrency: Requests a diffusion worker holds: its step batch plus a lookahead.
diffusion.prefetch_multiplier: Messages a worker reserves per slot.
diffusion.max_batch_size: Requests one denoising step runs together (with
    `scheduler.batch_size`).
diffusion.model: The one model this diffusion worker serves, and an image request's default
    (always registered).
diffusion.video_model: The model a text-to-video request that names none runs on (always
    registered).
diffusion.video_image_model: The model an image-to-video request that names none runs on
    (always registered).
diffusion.audio_model: The model a text-to-audio request that names none runs on (always
    registered).
diffusion.device: `auto` (CUDA when present, else CPU), `cuda`, `cuda:N` or `cpu`.
diffusion.dtype: The pipeline's dtype; `auto`: bfloat16 on CUDA, float32 on a CPU.
diffusion.step_cache: The pool's step cache: `none`, `taylorseer`, `magcache`,
    `first_block`, `pab`, `cache_dit`; requests may override.
diffusion.step_cache_params: Parameters of the step cache (e.g. `{threshold: 0.08}` for
    `first_block`).
diffusion.cache_affinity: Route a request to the live worker whose DiT cache or adapters
    hold its keys.
speech.queue: The speech pool's queue.
speech.pool_type: Celery's execution pool (`--pool`) of each speech worker.
speech.concurrency: Requests a speech worker speaks at once, their pieces batched.
speech.prefetch_multiplier: Messages a worker reserves per slot.
speech.engine: `transformers` (VITS / MMS-TTS through `VitsModel`).
speech.model: The text-to-speech model: a folder under `models_dir`, a path, or a hub id.
speech.device: `auto` (CUDA when present, else CPU), `cuda`, `cuda:N` or `cpu`.
speech.dtype: The model's load dtype; `auto`: the checkpoint's on CUDA, float32 on a CPU.
speech.max_batch_size: Pieces one forward pass runs (those with the same voice and speed).
speech.voices: The model's speakers by name (name -> speaker id), as requests and
    `/v1/audio/voices` use them.
speech.default_voice: The voice of a request that names none; empty: the first of `voices`.
loras: The LoRA adapters requests may name: name -> folder (PEFT or diffusers format;
    relative: under `models_dir`).
lora.max_loras: AR: distinct adapters in one vLLM batch.
lora.max_lora_rank: AR: vLLM's largest adapter rank (1, 8, 16, 32, 64, ...); combined
    adapters add ranks.
lora.max_cpu_loras: AR: adapters vLLM keeps loaded (at least `max_loras`).
lora.memory_gib: Diffusion: device memory for loaded adapters per worker, in GiB, out of its
    budget (`lora.memory_gb` is read too).
lora.mixed_batches: Diffusion: requests with different adapter sets share a denoising step.
models: The diffusion models requests may name (`model=`): name (each names a queue
    `diffusion.<name>`) -> entry.
models.<name>.path: A folder (relative: under `models_dir`) or a hub id; empty: the name
    under `models_dir`, else the name as a hub id.
models.<name>.family: The model's family (`flux`, `sd3`, `qwen-image`, `wan`,
    `stable-audio`, `generic:<Class>`, ...); empty: read from `model_index.json`.
api.token: Bearer token every API call must carry (`OMNI_API_TOKEN` sets it too); empty: no
    authentication.
api.max_body_mb: Bodies above this many MiB are refused with 413.
api.webhook_secret: HMAC-SHA256 key of webhook signatures; webhooks are refused without one.
api.webhook_max_attempts: Delivery attempts of one webhook before it goes to the failed
    list.
api.webhook_timeout_s: How long one webhook POST may take before it counts as failed.
api.wait_timeout_s: How long the OpenAI endpoints (and `Prefer: wait`) wait for a result
    before 504.
api.retry_after_s: The `Retry-After` of a 429 (the pool is full).
api.public_url: The base of the URLs the API answers with (e.g. `https://example.com/omni`);
    empty: the URL the request came to.
api.flower_url: Where the operations page links to Flower; empty: no link.
api.grafana_url: Where the operations page links to Grafana; empty: no link.
"""


def parse_docs(text: str) -> dict[str, str]:
    """`FIELD_DOCS_TEXT` as a dict of dotted name -> one line."""
    docs: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("    "):
            docs[name] += " " + line.strip()
        elif line.strip():
            name, _, text_part = line.partition(": ")
            docs[name] = text_part.strip()
    return docs


FIELD_DOCS = parse_docs(FIELD_DOCS_TEXT)

INTRO = """\
# Configuration reference

Generated from the config dataclasses (`omni_tasks/config/schema.py` and `pools.py`)
by `python -m omni_tasks.config.reference`; `tests/config/test_config_reference.py`
keeps this page equal to what it generates.

`config/default.yaml` is the embedded default (tiny models on a CPU); `OMNI_CONFIG`
names another YAML file. Any field is overridden by an environment variable: `OMNI_`,
then the dotted name in capitals with `__` for each dot
(`OMNI_SCHEDULER__SCHEDULER_TYPE=hybrid`). Mappings come as JSON or YAML flow
(`OMNI_LORAS='{"ink": "loras/ink"}'`). A bad value raises `ConfigError` naming the
field. The defaults below are the schema's; `config/default.yaml` sets a few otherwise
(`scheduler.scheduler_type: priority`, `ar.dtype: float32`). Memory is in GiB (2**30
bytes) and named `*_gib`; see the [glossary](glossary.md) for the words used here.
"""


def render() -> str:
    """The whole page, one table per section."""
    parts = [INTRO]
    for prefix, cls in sections():
        parts.append(render_section(prefix, cls))
    parts.append(render_renames())
    return "\n".join(parts)


def render_renames() -> str:
    """The keys read under an older name (`loading.RENAMED_KEYS`)."""
    lines = [
        "## Renamed keys",
        "",
        "Files, mappings and `OMNI_*` variables that use an older name are still read: the",
        "value goes to the new field, and a deprecation warning names it.",
        "",
        "| older name | field |",
        "|---|---|",
    ]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED_KEYS.items()]
    return "\n".join(lines) + "\n"


def sections() -> list[tuple[str, type]]:
    """The top level, then each nested dataclass field, then the registry entries."""
    found: list[tuple[str, type]] = [("", CoreModuleConfig)]
    hints = typing.get_type_hints(CoreModuleConfig)
    for f in dataclasses.fields(CoreModuleConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            found.append((f.name, hints[f.name]))
    found.append(("models.<name>", ModelEntry))
    return found


def render_section(prefix: str, cls: type) -> str:
    """One section: its heading, its class docstring's first paragraph, its table."""
    title = f"`{prefix}`" if prefix else "Top level"
    lines = [f"## {title} (`{cls.__name__}`)", ""]
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    if summary and not summary.startswith(f"{cls.__name__}("):
        lines += [summary, ""]
    lines += ["| field | type | default | environment | description |", "|---|---|---|---|---|"]
    for name, tp, default in own_fields(cls):
        dotted = f"{prefix}.{name}" if prefix else name
        lines.append(
            f"| `{dotted}` | {type_name(tp)} | {default_text(default)} "
            f"| {env_name(dotted)} | {describe(dotted)} |"
        )
    return "\n".join(lines) + "\n"


def own_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """The section's leaf fields (nested dataclass fields are sections of their own)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, hints[f.name], default))
    return rows


def describe(dotted: str) -> str:
    """The field's one line; a KeyError names a field that has none."""
    if dotted not in FIELD_DOCS:
        raise KeyError(f"{dotted}: no description in omni_tasks.config.reference.FIELD_DOCS")
    return FIELD_DOCS[dotted].replace("|", "\\|")


def type_name(tp: Any) -> str:
    """`int`, `str or empty`, `dict[str, float]`, or an enum's values."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " / ".join(f"`{member.value}`" for member in tp)
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{type_name(rest[0])} or empty"
    if isinstance(tp, type) and not args:
        return f"`{tp.__name__}`"
    return f"`{tp}`".replace("omni_tasks.model_registry.", "")


def default_text(value: Any) -> str:
    """The default as YAML would spell it."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {v}" for k, v in value.items())
        return f"`{{{inner}}}`"
    return f"`{value}`"


def env_name(dotted: str) -> str:
    """The environment variable that sets the field, where one does."""
    if "<name>" in dotted:
        return "(`OMNI_MODELS`)"
    return "`OMNI_" + dotted.replace(".", "__").upper() + "`"


def main(argv: list[str] | None = None) -> int:
    """Write the page (or, with `--check`, exit 1 when it differs from `render()`)."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        return 0 if current == text else 1
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
