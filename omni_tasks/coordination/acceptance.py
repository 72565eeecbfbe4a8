"""Accepting a request on the send path: its id checked, its place in its pool, its
ledger entry and its message, all or nothing.

Where the broker is the coordination Redis itself (the default: `broker_url` unset) and
the app publishes through omni-tasks' Redis transport, the acceptance rides on the
publish. The transport publishes the message through `Acceptance.accept`, and one
script (`scripts/admit.lua`) checks the id, admits, records in the ledger and publishes
in one step. A send that raises has then either done all of it or none of it.

With another broker (RabbitMQ, or a Redis other than `redis_url`) the request is
accepted first and published after; a failed publish undoes the acceptance.

A send that cannot reach Redis or the broker raises `BrokerUnavailableError`. Its
`may_be_accepted` says whether the accepting step may have happened (the connection
broke after it was sent). The same request sent again under the same id is safe
either way: a repeat is never published twice (`idempotency`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis
from kombu.exceptions import KombuError

from omni_tasks.config import CoreModuleConfig
from omni_tasks.coordination import admission, client, ledger
from omni_tasks.coordination.client import OmniRedis, redacted
from omni_tasks.errors import BrokerUnavailableError

log = logging.getLogger(__name__)

#: What the client libraries raise when Redis or the broker cannot be reached.
UNREACHABLE: tuple[type[BaseException], ...] = (redis.RedisError, KombuError, OSError)


@dataclass
class Acceptance:
    """One request a send is accepting: what `admission.admit` needs (the sender's Redis
    client and config among it), and how far it got. `attempted` is set once the
    accepting script may have reached Redis (the request may have been accepted even if
    no reply came); `outcome` holds its reply."""

    client: OmniRedis
    config: CoreModuleConfig
    queue: str
    admission_id: str
    enforce: bool = True
    counted: bool = True
    entry: ledger.Entry | None = None
    fingerprint: str | None = None
    attempted: bool = False
    outcome: admission.Admission | None = None
    #: The message the transport handed over, waiting for its task-sent event, which
    #: the same script publishes (`accept_with_event`); and what that step raised.
    stashed: tuple[str, str] | None = None
    failure: BaseException | None = None

    def stash(self, message: tuple[str, str]) -> None:
        """The transport's publish of the message: held until its task-sent event."""
        self.stashed = message

    def accept_with_event(self, events: list[tuple[str, str]]) -> None:
        """Accept the stashed message and publish its task-sent event (topic, payload)
        in one step. Never raises: Celery's event dispatcher would buffer the event and
        swallow the error; `send` raises it once the publish returns."""
        try:
            self.accept(self.stashed, events)
        except BaseException as exc:  # noqa: BLE001 - raised again by `send`
            self.failure = exc

    def accept_stashed(self) -> admission.Admission:
        return self.accept(self.stashed)

    def accept(
        self, message: tuple[str, str] | None = None, events: list[tuple[str, str]] | None = None
    ) -> admission.Admission:
        """Run the accepting step, publishing `message` (list, envelope) with it."""
        try:
            self.outcome = admission.admit(
                self.client,
                self.config,
                self.queue,
                self.admission_id,
                enforce=self.enforce,
                counted=self.counted,
                entry=self.entry,
                fingerprint=self.fingerprint,
                message=message,
                events=events,
            )
        except UNREACHABLE as exc:
            if refused_at_connect(exc) and not self.attempted:
                # Nothing reached Redis: refuse now, without the publish's retries.
                raise unavailable(self, exc) from exc
            self.attempted = True
            raise
        self.attempted = True
        return self.outcome


#: The acceptance of the send running in this context, while it publishes.
_in_send: ContextVar[Acceptance | None] = ContextVar("omni_acceptance", default=None)


def in_send() -> bool:
    """Whether a send in this context holds its request's acceptance (the `send_task`
    hook then accepts nothing a second time)."""
    return _in_send.get() is not None


@contextlib.contextmanager
def holding(acceptance: Acceptance) -> Iterator[None]:
    """Hold `acceptance` as this context's send while its message is published: the
    `send_task` hook accepts nothing a second time, and a transport that accepts on
    publish hands the message to `acceptance.accept` (`awaiting_publish`)."""
    token = _in_send.set(acceptance)
    try:
        yield
    finally:
        _in_send.reset(token)


def awaiting_event() -> Acceptance | None:
    """The acceptance of the send in this context whose message waits for its task-sent
    event (`Acceptance.stash`); else None."""
    pending = _in_send.get()
    if pending is None or pending.outcome is not None or pending.stashed is None:
        return None
    return pending


def awaiting_publish() -> Acceptance | None:
    """The acceptance of the send in this context when it is to ride on the message's
    publish (`Acceptance.accept` with the message) and has not run yet; else None."""
    pending = _in_send.get()
    if pending is None or pending.outcome is not None or pending.entry is None:
        return None
    return pending


def send(
    acceptance: Acceptance,
    publish: Callable[[], Any],
    repeated: Callable[[str], Any],
    *,
    on_publish: bool,
) -> Any:
    """Accept a request and publish its message with `publish`, all or nothing.

    `on_publish`: the transport accepts the request as it publishes (`awaiting_publish`);
    otherwise it is accepted first. Returns what `publish` returned, or `repeated(id)`
    for a repeat of a request accepted before (nothing is published). Raises
    `BrokerUnavailableError` when Redis or the broker cannot be reached.
    """
    try:
        if on_publish:
            client.check_reachable(acceptance.config.redis_url)
        else:
            acceptance.accept()
    except UNREACHABLE as exc:
        raise unavailable(acceptance, exc) from exc
    outcome = acceptance.outcome
    if outcome is not None and outcome.repeat:
        return repeated(outcome.admission_id)
    token = _in_send.set(acceptance)
    try:
        result = publish()
    except UNREACHABLE as exc:
        raise unavailable(acceptance, exc, undone=not on_publish and _undo(acceptance)) from exc
    except BaseException:
        if not on_publish:
            _undo(acceptance)
        raise
    finally:
        _in_send.reset(token)
    failure = acceptance.failure
    if failure is not None:
        if isinstance(failure, UNREACHABLE):
            raise unavailable(acceptance, failure) from failure
        raise failure
    if acceptance.outcome is None and acceptance.stashed is not None:  # no task-sent event
        try:
            acceptance.accept_stashed()
        except UNREACHABLE as exc:
            raise unavailable(acceptance, exc) from exc
    if acceptance.outcome is None:  # no queue was bound, or another transport published
        log.warning(
            "request %s: its publish did not accept it; accepted now (the reaper "
            "publishes it again if no queue took it)",
            acceptance.admission_id,
        )
        acceptance.accept()
    if acceptance.outcome is not None and acceptance.outcome.repeat:
        return repeated(acceptance.outcome.admission_id)
    return result


def refused_at_connect(exc: BaseException) -> bool:
    """Whether a Redis error came from opening the connection, before any command was
    sent (redis-py's wording); anything else may have reached the server."""
    text = str(exc)
    connecting = " connecting to " in text or text.startswith("Error connecting to")
    timed_out = text == "Timeout connecting to server"
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and (
        connecting or timed_out
    )


def _undo(acceptance: Acceptance) -> bool:
    """Give back what an acceptance took whose publish failed; whether that worked."""
    if acceptance.outcome is None:
        return True
    with contextlib.suppress(*UNREACHABLE):
        acceptance.outcome.undo(acceptance.client, acceptance.config.pool_queues())
        return True
    return False


def unavailable(
    acceptance: Acceptance, exc: BaseException, undone: bool = False
) -> BrokerUnavailableError:
    """The error of a send that could not reach Redis or the broker (the next send
    checks that Redis answers before it publishes: `client.check_reachable`)."""
    config = acceptance.config
    client.failed(config.redis_url)
    may_be_accepted = acceptance.attempted and not undone
    request_id = acceptance.admission_id
    url = redacted(config.redis_url if isinstance(exc, redis.RedisError) else config.broker)
    if may_be_accepted:
        outcome = (
            "it may have been accepted and may run: send the same request again under "
            f"request_id {request_id!r}, which runs it at most once"
        )
    else:
        outcome = "nothing was accepted and nothing will run"
    message = f"request {request_id} not sent: cannot reach {url} ({exc}); {outcome}"
    return BrokerUnavailableError(request_id, message, may_be_accepted)
