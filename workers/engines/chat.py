"""Chat requests: messages rendered with the model's chat template into prompt tokens.

Both text engines render on the worker with the tokenizer's own `apply_chat_template`,
as vLLM's chat path does, to token ids: the template writes the special tokens (BOS,
role markers) itself, so the ids go to the model as they are, never tokenized again
(which would add a second BOS). The prompt's token count is then the rendering's.

A model without a template refuses chat (`RequestValidationError`, field `messages`)
unless `ar.chat_template` gives one: Jinja text, or the path of a file that holds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omni_tasks.errors import RequestValidationError

#: Longest template text taken as such rather than as a path.
_PATH_MAX = 4096


def load_chat_template(setting: str | None) -> str | None:
    """`ar.chat_template`: the template text, read from its file when it names one."""
    if not setting:
        return None
    if len(setting) < _PATH_MAX and "{" not in setting:
        path = Path(setting).expanduser()
        if path.is_file():
            return path.read_text()
    return setting


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str | None = None
) -> list[int]:
    """The prompt token ids of `messages` with the generation prompt added; `template`
    (the config's) replaces the tokenizer's own."""
    if not (template or getattr(tokenizer, "chat_template", None)):
        raise RequestValidationError(
            "messages",
            "this model has no chat template: send a prompt (generate_text), or set "
            "ar.chat_template on the AR workers",
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
        )
    except Exception as exc:  # a template error (jinja raise_exception, bad roles)
        raise RequestValidationError("messages", f"the chat template refused them: {exc}") from exc
    ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
    return [int(i) for i in ids]
