"""Runs the configured filters per stage; owns timeouts, errors and held denials.

For each stage the filters named in `[pipeline]` run in order; the first verdict
other than CONTINUE settles the stage. A filter that raises or overruns its timeout
gets its own `on_error` action (TEMPFAIL unless it is advisory), so a broken
dependency means "try later", never "let everything through". Every call leaves a
line in the results record and in the filter metrics.

The pipeline does not decide what a verdict means for the SMTP dialogue: the SMTP
handler holds CONNECT/HELO/MAIL denials until RCPT and combines MESSAGE verdicts of
several tenants (see `combine_message_verdicts`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from filters.base import (
    CONTINUE,
    Action,
    EnvelopeView,
    Filter,
    MessageView,
    Outcome,
    ResultEntry,
    Results,
    SessionInfo,
    Stage,
    TenantView,
    Verdict,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class PipelineConfigError(Exception):
    """The configured pipeline names unknown filters or misplaces them."""


class FilterContext:
    """The Context a filter sees; note() writes to the transaction's results."""

    def __init__(self, stage: Stage, session: SessionInfo, envelope: EnvelopeView,
                 tenant: TenantView | None, message: MessageView | None, services: Any,
                 results: Results, session_results: Results | None = None) -> None:
        self._stage = stage
        self._session = session
        self._envelope = envelope
        self._tenant = tenant
        self._message = message
        self._services = services
        self._results = results
        # Facts from CONNECT/HELO live on the session; a transaction sees them too.
        self._session_results = session_results
        self.current_filter = ""

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def session(self) -> SessionInfo:
        return self._session

    @property
    def envelope(self) -> EnvelopeView:
        return self._envelope

    @property
    def tenant(self) -> TenantView | None:
        return self._tenant

    @property
    def message(self) -> MessageView | None:
        return self._message

    @property
    def services(self) -> Any:
        return self._services

    def note(self, outcome: Outcome, detail: str = "") -> None:
        self._results.add(ResultEntry(self.current_filter, self._stage, outcome, detail,
                                      None if self._tenant is None else self._tenant.id))

    async def once(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        facts = self._results.facts
        task = facts.get(key)
        if task is None and self._session_results is not None:
            task = self._session_results.facts.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            facts[key] = task
        # Shielded: one tenant's filter timing out must not cancel the others' result.
        result: T = await asyncio.shield(task)
        return result

    async def session_once(self, key: str, compute: Callable[[], Awaitable[T]],
                           keep: Callable[[T], bool]) -> T:
        facts = (self._session_results or self._results).facts
        task = facts.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            facts[key] = task
            task.add_done_callback(lambda done: self._forget_unless_kept(facts, key, done,
                                                                         keep))
        result: T = await asyncio.shield(task)
        return result

    @staticmethod
    def _forget_unless_kept(facts: dict[str, Any], key: str, task: asyncio.Future[Any],
                            keep: Callable[[Any], bool]) -> None:
        unkept = task.cancelled() or task.exception() is not None or not keep(task.result())
        if unkept and facts.get(key) is task:
            del facts[key]

    def fact(self, key: str) -> Any:
        task = self._results.facts.get(key)
        if task is None and self._session_results is not None:
            task = self._session_results.facts.get(key)
        if task is None or not task.done() or task.cancelled() or task.exception():
            return None
        return task.result()


@dataclass(frozen=True, slots=True)
class StageResult:
    verdict: Verdict
    filter: str  # "" when no filter settled the stage


class Pipeline:
    def __init__(self, stages: Mapping[Stage, Sequence[Filter]], observe: Any = None) -> None:
        self.stages = {stage: tuple(stages.get(stage, ())) for stage in Stage}
        self._observe = observe  # callable(filter, stage, action, seconds) for metrics
        # Each filter with a disconnect hook once, found here rather than per session.
        closers: dict[int, Filter] = {}
        for filters in self.stages.values():
            for filt in filters:
                if getattr(filt, "session_closed", None) is not None:
                    closers.setdefault(id(filt), filt)
        self.closers = tuple(closers.values())

    @classmethod
    def from_names(cls, names: Mapping[str, Sequence[str]], registry: Mapping[str, type[Filter]],
                   observe: Any = None) -> Pipeline:
        problems: list[str] = []
        built: dict[str, Filter] = {}
        stages: dict[Stage, list[Filter]] = {}
        for stage in Stage:
            for name in names.get(stage.value, ()):
                cls_ = registry.get(name)
                if cls_ is None:
                    problems.append(f"pipeline.{stage.value}: unknown filter {name!r} "
                                    f"(known: {', '.join(sorted(registry)) or 'none'})")
                    continue
                if stage not in cls_.stages:
                    problems.append(f"pipeline.{stage.value}: filter {name!r} runs only at "
                                    + ", ".join(s.value for s in sorted(cls_.stages,
                                                                        key=_order)))
                    continue
                instance = built.setdefault(name, cls_())
                stages.setdefault(stage, []).append(instance)
        if problems:
            raise PipelineConfigError("\n".join(problems))
        return cls(stages, observe)

    async def session_closed(self, session: SessionInfo) -> None:
        """The disconnect hook: every filter with `session_closed` hears of it once."""
        for filt in self.closers:
            try:
                await filt.session_closed(session)  # type: ignore[attr-defined]
            except Exception:
                log.warning("session=%s %s.session_closed failed", session.session_id,
                            filt.name, exc_info=True)

    def describe(self) -> str:
        lines = []
        for stage in Stage:
            filters = self.stages[stage]
            listed = ", ".join(f"{f.name} (timeout {f.timeout:g}s, on error "
                               f"{f.on_error.value})" for f in filters) or "-"
            lines.append(f"{stage.value:8} {listed}")
        lines.append("rcpt     built in before the filters: recipient verification against "
                     "the tenant directory")
        return "\n".join(lines)

    async def run(self, ctx: FilterContext) -> StageResult:
        # Headers from filters that let the message go on (X-Spam-Score, "unscanned")
        # travel with whatever verdict settles the stage.
        headers: list[tuple[str, str]] = []
        for filt in self.stages[ctx.stage]:
            ctx.current_filter = filt.name
            started = time.perf_counter()
            try:
                async with asyncio.timeout(filt.timeout):
                    verdict = await filt.check(ctx)
                if not isinstance(verdict, Verdict):  # a buggy filter is a failing filter
                    raise TypeError(f"check() returned {type(verdict).__name__}, not a Verdict")
            except Exception as exc:  # any failure becomes on_error
                reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                log.warning("session=%s filter %s failed at %s: %s", ctx.session.session_id,
                            filt.name, ctx.stage.value, reason, exc_info=not isinstance(
                                exc, TimeoutError))
                ctx.note(Outcome.ERROR, reason)
                verdict = Verdict(filt.on_error, reason=f"{filt.name} {reason}")
            if self._observe is not None:
                self._observe(filt.name, ctx.stage, verdict.action,
                              time.perf_counter() - started)
            if verdict.action is not Action.CONTINUE:
                if headers:
                    verdict = dataclasses.replace(
                        verdict, add_headers=(*headers, *verdict.add_headers))
                return StageResult(verdict, filt.name)
            headers.extend(verdict.add_headers)
        if headers:
            return StageResult(Verdict(Action.CONTINUE, add_headers=tuple(headers)), "")
        return StageResult(CONTINUE, "")


def _order(stage: Stage) -> int:
    return list(Stage).index(stage)


@dataclass(frozen=True, slots=True)
class Combined:
    """The one SMTP answer for a message shared by several tenants."""

    action: Action  # ACCEPT (250), TEMPFAIL (4xx) or REJECT (5xx)
    reply_from: str | None  # tenant whose verdict supplied the 4xx/5xx reply


def combine_message_verdicts(verdicts: Mapping[str, Verdict]) -> Combined:
    """Most cautious common answer (DESIGN: scan once, decide per tenant).

    4xx if any tenant's verdict is TEMPFAIL; 5xx only if every tenant rejects; else
    250, and the copies of tenants that would reject go to their quarantine.
    """
    tempfailed = [t for t, v in verdicts.items() if v.action is Action.TEMPFAIL]
    if tempfailed:
        return Combined(Action.TEMPFAIL, tempfailed[0])
    rejected = [t for t, v in verdicts.items() if v.action is Action.REJECT]
    if rejected and len(rejected) == len(verdicts):
        return Combined(Action.REJECT, rejected[0])
    return Combined(Action.ACCEPT, None)
