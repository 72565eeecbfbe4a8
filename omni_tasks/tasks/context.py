"""The producer side's context: the config and the Redis client a process's sends use.

The Celery app carries one (`OmniCelery.omni`), built with the app at import, the
producer side's entry point; a task reaches it through its app (`producer_context`),
and the send path hands its config and client down to the acceptance, the admission,
the ledger and the idempotency check, which look nothing up themselves. A context
given no config follows the process config (`set_config`), as an application that
configures omni-tasks after importing it expects. A worker's runtime holds one too,
with the config its worker serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni_tasks.config import CoreModuleConfig, get_config, set_config
from omni_tasks.coordination.client import OmniRedis, client_for
from omni_tasks.coordination.keyspace import KeySpace, keyspace


@dataclass
class ProducerContext:
    """The config a process sends under and its client of the config's Redis."""

    attached: CoreModuleConfig | None = None

    @property
    def config(self) -> CoreModuleConfig:
        """The attached config, else the process config."""
        return self.attached if self.attached is not None else get_config()

    @property
    def keys(self) -> KeySpace:
        """The keys under the config's `key_prefix`."""
        return keyspace(self.config.key_prefix)

    @property
    def redis(self) -> OmniRedis:
        """The process's client of the config's Redis, naming keys under its prefix."""
        return client_for(self.config)

    def switch_to(self, config: CoreModuleConfig) -> None:
        """Send by `config` from the next message on: it replaces the attached config,
        or, for a context following the process config, the process config."""
        if self.attached is not None:
            self.attached = config
        else:
            set_config(config)


#: The context of an app that carries none (a plain Celery app holding omni-tasks tasks).
PROCESS = ProducerContext()


def producer_context(app: Any) -> ProducerContext:
    """The context `app` carries (`OmniCelery.omni`), else the process's."""
    found = getattr(app, "omni", None)
    return found if isinstance(found, ProducerContext) else PROCESS
