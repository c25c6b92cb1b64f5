"""The filter pipeline (gateway/pipeline.py): order, settling, errors, timeouts, combining."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filters.base import (
    CONTINUE,
    Action,
    Context,
    Outcome,
    Reply,
    ResultEntry,
    Results,
    Stage,
    Verdict,
)
from gateway.pipeline import (
    Combined,
    FilterContext,
    Pipeline,
    PipelineConfigError,
    StageResult,
    combine_message_verdicts,
)

# -- fakes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeSession:
    session_id: str = "S1"
    client_ip: str = "192.0.2.1"
    client_port: int = 40000
    helo: str | None = "client.example.org"
    tls: bool = False


@dataclass(frozen=True)
class FakeRecipient:
    address: str
    lookup_key: str
    tenant: str


@dataclass(frozen=True)
class FakeEnvelope:
    sender: str = "a@example.org"
    recipients: Sequence[FakeRecipient] = ()
    current_recipient: FakeRecipient | None = None
    size: int = 0


@dataclass(frozen=True)
class FakeTenant:
    id: str
    policy: dict[str, Any] = field(default_factory=dict)


class Calls(list[str]):
    """Which filters ran, in order."""


def make_ctx(stage: Stage = Stage.RCPT, tenant: str | None = "acme",
             services: Any = None) -> tuple[FilterContext, Results]:
    results = Results()
    ctx = FilterContext(stage, FakeSession(), FakeEnvelope(),
                        None if tenant is None else FakeTenant(tenant), None, services, results)
    return ctx, results


def make_filter(name: str, verdict: Verdict | None = None, *,
                stages: frozenset[Stage] = frozenset(Stage), timeout: float = 1.0,
                on_error: Action = Action.TEMPFAIL, raises: BaseException | None = None,
                sleep: float = 0.0, outcome: Outcome | None = Outcome.PASS,
                returns: Any = None) -> type:
    """A filter class; each check appends its name to ctx.services (a Calls list)."""

    class Fake:
        async def check(self, ctx: Context) -> Verdict:
            ctx.services.append(name)
            if sleep:
                await asyncio.sleep(sleep)
            if raises is not None:
                raise raises
            if returns is not None:
                return returns  # type: ignore[no-any-return]
            if outcome is not None:
                ctx.note(outcome, f"{name} looked")
            return verdict or CONTINUE

    Fake.name = name  # type: ignore[attr-defined]
    Fake.stages = stages  # type: ignore[attr-defined]
    Fake.timeout = timeout  # type: ignore[attr-defined]
    Fake.on_error = on_error  # type: ignore[attr-defined]
    Fake.__name__ = Fake.__qualname__ = f"Fake_{name}"
    return Fake


def pipeline_of(*classes: type, stage: Stage = Stage.RCPT) -> Pipeline:
    return Pipeline({stage: [cls() for cls in classes]})


async def run(pipeline: Pipeline, stage: Stage = Stage.RCPT
              ) -> tuple[StageResult, Calls, Results]:
    calls = Calls()
    ctx, results = make_ctx(stage, services=calls)
    return await pipeline.run(ctx), calls, results


REJECT = Verdict(Action.REJECT, Reply(550, "5.7.1", "No"), reason="policy")
TEMPFAIL = Verdict(Action.TEMPFAIL, Reply(451, "4.7.1", "Later"))
ACCEPT = Verdict(Action.ACCEPT)


# -- running a stage --------------------------------------------------------------------------


async def test_empty_stage_continues() -> None:
    result, calls, results = await run(Pipeline({}))
    assert result == StageResult(CONTINUE, "")
    assert calls == [] and results.entries == []


async def test_all_continue_runs_every_filter_in_order() -> None:
    pipeline = pipeline_of(make_filter("a"), make_filter("b"), make_filter("c"))
    result, calls, results = await run(pipeline)
    assert result == StageResult(CONTINUE, "")
    assert calls == ["a", "b", "c"]
    assert [(e.filter, e.outcome) for e in results.entries] == [
        ("a", Outcome.PASS), ("b", Outcome.PASS), ("c", Outcome.PASS)]


async def test_first_non_continue_verdict_settles() -> None:
    pipeline = pipeline_of(make_filter("a"), make_filter("b", REJECT),
                           make_filter("c", TEMPFAIL))
    result, calls, _ = await run(pipeline)
    assert result == StageResult(REJECT, "b")
    assert calls == ["a", "b"]


async def test_accept_stops_the_stage() -> None:
    pipeline = pipeline_of(make_filter("allowlist", ACCEPT), make_filter("rbl", REJECT))
    result, calls, _ = await run(pipeline)
    assert result == StageResult(ACCEPT, "allowlist")
    assert calls == ["allowlist"]


async def test_only_the_context_stage_runs() -> None:
    pipeline = Pipeline({Stage.HELO: [make_filter("h", REJECT)()],
                         Stage.RCPT: [make_filter("r")()]})
    result, calls, _ = await run(pipeline, Stage.RCPT)
    assert result == StageResult(CONTINUE, "")
    assert calls == ["r"]


async def test_notes_carry_filter_stage_and_tenant() -> None:
    pipeline = pipeline_of(make_filter("a", outcome=Outcome.FAIL), stage=Stage.MESSAGE)
    calls = Calls()
    ctx, results = make_ctx(Stage.MESSAGE, tenant="globex", services=calls)
    await pipeline.run(ctx)
    assert results.entries == [ResultEntry("a", Stage.MESSAGE, Outcome.FAIL, "a looked",
                                           "globex")]
    ctx, results = make_ctx(Stage.MESSAGE, tenant=None, services=calls)
    await pipeline.run(ctx)
    assert results.entries[0].tenant is None


async def test_context_exposes_views() -> None:
    calls = Calls()
    ctx, _ = make_ctx(Stage.MAIL, services=calls)
    assert ctx.stage is Stage.MAIL
    assert ctx.session.session_id == "S1"
    assert ctx.envelope.sender == "a@example.org"
    assert ctx.tenant is not None and ctx.tenant.id == "acme"
    assert ctx.message is None
    assert ctx.services is calls


# -- errors and timeouts -------------------------------------------------------------------------


async def test_exception_becomes_on_error_with_error_note(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    pipeline = pipeline_of(make_filter("a"), make_filter("broken", raises=RuntimeError("boom")),
                           make_filter("c", REJECT))
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        result, calls, results = await run(pipeline)
    assert result.filter == "broken"
    assert result.verdict.action is Action.TEMPFAIL
    assert calls == ["a", "broken"]
    errors = [e for e in results.entries if e.outcome is Outcome.ERROR]
    assert errors == [ResultEntry("broken", Stage.RCPT, Outcome.ERROR, "RuntimeError", "acme")]
    # the peer never sees exception detail; the operator log does
    assert result.verdict.reply is None
    assert "boom" not in result.verdict.reason
    assert any("broken" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("on_error", [Action.TEMPFAIL, Action.REJECT, Action.ACCEPT])
async def test_exception_uses_the_filters_own_on_error(on_error: Action) -> None:
    pipeline = pipeline_of(make_filter("x", raises=ValueError(), on_error=on_error),
                           make_filter("after"))
    result, calls, _ = await run(pipeline)
    assert result.verdict.action is on_error
    assert result.filter == "x"
    assert calls == ["x"]


async def test_advisory_filter_error_continues() -> None:
    pipeline = pipeline_of(make_filter("advisory", raises=OSError("dns"),
                                       on_error=Action.CONTINUE),
                           make_filter("next", REJECT))
    result, calls, results = await run(pipeline)
    assert result == StageResult(REJECT, "next")
    assert calls == ["advisory", "next"]
    assert [(e.filter, e.outcome) for e in results.entries] == [
        ("advisory", Outcome.ERROR), ("next", Outcome.PASS)]


async def test_timeout_becomes_on_error() -> None:
    pipeline = pipeline_of(make_filter("slow", REJECT, timeout=0.05, sleep=5.0),
                           make_filter("after"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    result, calls, results = await run(pipeline)
    assert loop.time() - started < 1.0
    assert result.filter == "slow"
    assert result.verdict.action is Action.TEMPFAIL  # not the REJECT it would have returned
    assert "timeout" in result.verdict.reason
    assert calls == ["slow"]
    assert [(e.filter, e.outcome, e.detail) for e in results.entries] == [
        ("slow", Outcome.ERROR, "timeout")]


async def test_timeout_with_advisory_on_error_continues() -> None:
    pipeline = pipeline_of(make_filter("slow", timeout=0.05, sleep=5.0, on_error=Action.CONTINUE),
                           make_filter("after", ACCEPT))
    result, calls, _ = await run(pipeline)
    assert result == StageResult(ACCEPT, "after")
    assert calls == ["slow", "after"]


async def test_filter_within_its_timeout_is_not_cut_off() -> None:
    pipeline = pipeline_of(make_filter("ok", REJECT, timeout=1.0, sleep=0.01))
    result, _, _ = await run(pipeline)
    assert result == StageResult(REJECT, "ok")


async def test_filter_returning_no_verdict_is_an_error() -> None:
    pipeline = pipeline_of(make_filter("buggy", returns="reject"), make_filter("after"))
    result, calls, results = await run(pipeline)
    assert result.filter == "buggy"
    assert result.verdict.action is Action.TEMPFAIL
    assert calls == ["buggy"]
    assert [(e.filter, e.outcome) for e in results.entries] == [("buggy", Outcome.ERROR)]


async def test_cancellation_is_not_swallowed() -> None:
    # The session task being cancelled (client gone) must not turn into a verdict.
    pipeline = pipeline_of(make_filter("slow", timeout=10.0, sleep=10.0))
    task = asyncio.ensure_future(run(pipeline))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_observe_sees_every_call() -> None:
    seen: list[tuple[str, Stage, Action]] = []

    def observe(name: str, stage: Stage, action: Action, seconds: float) -> None:
        assert seconds >= 0
        seen.append((name, stage, action))

    pipeline = Pipeline({Stage.MAIL: [make_filter("a")(), make_filter("b", raises=KeyError())(),
                                      make_filter("c")()]}, observe)
    await run(pipeline, Stage.MAIL)
    assert seen == [("a", Stage.MAIL, Action.CONTINUE), ("b", Stage.MAIL, Action.TEMPFAIL)]


# -- building from configuration ----------------------------------------------------------------

REGISTRY: dict[str, type] = {
    "rbl": make_filter("rbl", stages=frozenset({Stage.CONNECT, Stage.RCPT})),
    "spf": make_filter("spf", stages=frozenset({Stage.MAIL})),
    "size": make_filter("size", stages=frozenset({Stage.MESSAGE}), timeout=2.5),
    "av": make_filter("av", stages=frozenset({Stage.MESSAGE}), on_error=Action.CONTINUE),
}


def test_from_names_builds_stages_in_order() -> None:
    pipeline = Pipeline.from_names({"connect": ["rbl"], "mail": ["spf"],
                                    "rcpt": ["rbl"], "message": ["av", "size"]}, REGISTRY)
    assert [f.name for f in pipeline.stages[Stage.MESSAGE]] == ["av", "size"]
    assert [f.name for f in pipeline.stages[Stage.MAIL]] == ["spf"]
    assert pipeline.stages[Stage.HELO] == ()
    # one instance per filter, shared by the stages that name it
    assert pipeline.stages[Stage.CONNECT][0] is pipeline.stages[Stage.RCPT][0]


def test_from_names_accepts_tuples_of_config() -> None:
    pipeline = Pipeline.from_names({"message": ("size",)}, REGISTRY)
    assert [f.name for f in pipeline.stages[Stage.MESSAGE]] == ["size"]


def test_from_names_reports_every_problem() -> None:
    with pytest.raises(PipelineConfigError) as info:
        Pipeline.from_names({"connect": ["rbl", "nosuch"], "helo": ["spf"],
                             "message": ["size", "clamav", "rbl"]}, REGISTRY)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("pipeline.connect: unknown filter 'nosuch'")
    assert "av, rbl, size, spf" in lines[0]  # the known names, to help the operator
    assert lines[1] == "pipeline.helo: filter 'spf' runs only at mail"
    assert lines[2].startswith("pipeline.message: unknown filter 'clamav'")
    assert lines[3] == "pipeline.message: filter 'rbl' runs only at connect, rcpt"


def test_from_names_with_empty_registry() -> None:
    with pytest.raises(PipelineConfigError, match=r"unknown filter 'x' \(known: none\)"):
        Pipeline.from_names({"rcpt": ["x"]}, {})


def test_describe_lists_every_stage() -> None:
    pipeline = Pipeline.from_names({"rcpt": ["rbl"], "message": ["av", "size"]}, REGISTRY)
    text = pipeline.describe()
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[:5]] == [s.value for s in Stage]
    assert lines[0].split(None, 1)[1] == "-"
    assert "rbl (timeout 1s, on error tempfail)" in lines[3]
    assert lines[4].split(None, 1)[1] == (
        "av (timeout 1s, on error continue), size (timeout 2.5s, on error tempfail)")
    assert "recipient verification" in text


# -- combining MESSAGE verdicts of several tenants ------------------------------------------------

V = {action: Verdict(action) for action in Action}
A = Action


@pytest.mark.parametrize(("verdicts", "expected"), [
    ({"a": A.CONTINUE}, Combined(A.ACCEPT, None)),
    ({"a": A.ACCEPT}, Combined(A.ACCEPT, None)),
    ({"a": A.REJECT}, Combined(A.REJECT, "a")),
    ({"a": A.TEMPFAIL}, Combined(A.TEMPFAIL, "a")),
    ({"a": A.QUARANTINE}, Combined(A.ACCEPT, None)),
    ({"a": A.DISCARD}, Combined(A.ACCEPT, None)),
    ({"a": A.REJECT, "b": A.CONTINUE}, Combined(A.ACCEPT, None)),
    ({"a": A.CONTINUE, "b": A.REJECT}, Combined(A.ACCEPT, None)),
    ({"a": A.REJECT, "b": A.REJECT}, Combined(A.REJECT, "a")),
    ({"a": A.TEMPFAIL, "b": A.REJECT}, Combined(A.TEMPFAIL, "a")),
    ({"a": A.REJECT, "b": A.TEMPFAIL}, Combined(A.TEMPFAIL, "b")),
    ({"a": A.TEMPFAIL, "b": A.ACCEPT}, Combined(A.TEMPFAIL, "a")),
    ({"a": A.REJECT, "b": A.QUARANTINE}, Combined(A.ACCEPT, None)),
    ({"a": A.REJECT, "b": A.DISCARD}, Combined(A.ACCEPT, None)),
    ({"a": A.QUARANTINE, "b": A.DISCARD}, Combined(A.ACCEPT, None)),
    ({"a": A.REJECT, "b": A.REJECT, "c": A.REJECT}, Combined(A.REJECT, "a")),
    ({"a": A.REJECT, "b": A.REJECT, "c": A.ACCEPT}, Combined(A.ACCEPT, None)),
    ({"a": A.ACCEPT, "b": A.TEMPFAIL, "c": A.TEMPFAIL}, Combined(A.TEMPFAIL, "b")),
])
def test_combine_message_verdicts(verdicts: dict[str, Action], expected: Combined) -> None:
    assert combine_message_verdicts({t: V[a] for t, a in verdicts.items()}) == expected


@given(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(list(Action)), min_size=1))
def test_combine_is_the_most_cautious_common_answer(verdicts: dict[str, Action]) -> None:
    combined = combine_message_verdicts({t: V[a] for t, a in verdicts.items()})
    actions = set(verdicts.values())
    if A.TEMPFAIL in actions:
        assert combined.action is A.TEMPFAIL
        assert combined.reply_from is not None
        assert verdicts[combined.reply_from] is A.TEMPFAIL
    elif actions == {A.REJECT}:
        assert combined.action is A.REJECT
        assert combined.reply_from in verdicts
    else:
        assert combined == Combined(A.ACCEPT, None)
    # the answer does not depend on the order the tenants were listed in
    for order in itertools.islice(itertools.permutations(verdicts), 6):
        assert combine_message_verdicts(
            {t: V[verdicts[t]] for t in order}).action is combined.action


# -- session_once: facts shared by the transactions of one connection -----------------------


def _txn_ctx(session_results: Results) -> FilterContext:
    return FilterContext(Stage.MAIL, FakeSession(), FakeEnvelope(), None, None, None,
                         Results(), session_results)


async def test_session_once_computes_once_for_all_transactions() -> None:
    session_results, calls = Results(), []

    async def compute() -> str:
        calls.append("x")
        await asyncio.sleep(0)
        return "pass"

    first = await _txn_ctx(session_results).session_once("k", compute, keep=lambda r: True)
    second = await _txn_ctx(session_results).session_once("k", compute, keep=lambda r: True)
    assert (first, second, calls) == ("pass", "pass", ["x"])


async def test_session_once_forgets_results_it_must_not_keep() -> None:
    session_results, answers = Results(), iter(["temperror", "pass", "fail"])

    async def compute() -> str:
        return next(answers)

    def keep(result: str) -> bool:
        return result != "temperror"

    got = [await _txn_ctx(session_results).session_once("k", compute, keep=keep)
           for _ in range(3)]
    # The temperror is returned to its transaction but recomputed by the next one; the
    # pass then sticks for the rest of the connection.
    assert got == ["temperror", "pass", "pass"]


async def test_session_once_forgets_an_exception() -> None:
    session_results, attempts = Results(), []

    async def compute() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("resolver down")
        return "pass"

    with pytest.raises(OSError):
        await _txn_ctx(session_results).session_once("k", compute, keep=lambda r: True)
    assert await _txn_ctx(session_results).session_once("k", compute,
                                                        keep=lambda r: True) == "pass"
    assert len(attempts) == 2


async def test_session_once_keys_are_separate() -> None:
    session_results = Results()

    async def make(value: str) -> str:
        return value

    ctx = _txn_ctx(session_results)
    assert await ctx.session_once("spf_helo a.example", lambda: make("a"),
                                  keep=lambda r: True) == "a"
    assert await ctx.session_once("spf_helo b.example", lambda: make("b"),
                                  keep=lambda r: True) == "b"


# -- the disconnect hook ----------------------------------------------------------------------


async def test_session_closed_reaches_each_hooked_filter_once(
        caplog: pytest.LogCaptureFixture) -> None:
    heard: list[str] = []

    class Hooked:
        name = "hooked"
        stages = frozenset({Stage.CONNECT, Stage.MAIL})
        timeout = 1.0
        on_error = Action.CONTINUE

        async def check(self, ctx: Context) -> Verdict:
            return CONTINUE

        async def session_closed(self, session: Any) -> None:
            heard.append(f"{self.name}:{session.session_id}")

    class Broken(Hooked):
        name = "broken"

        async def session_closed(self, session: Any) -> None:
            raise RuntimeError("hook failed")

    hooked, broken, plain = Hooked(), Broken(), make_filter("plain")()
    pipeline = Pipeline({Stage.CONNECT: [hooked, plain, broken], Stage.MAIL: [hooked]})
    assert pipeline.closers == (hooked, broken)
    with caplog.at_level(logging.WARNING):
        await pipeline.session_closed(FakeSession())  # type: ignore[arg-type]
    assert heard == ["hooked:S1"]  # once, though the filter runs at two stages
    assert "S1 broken.session_closed failed" in caplog.text  # logged, not raised
    assert Pipeline({Stage.RCPT: [plain]}).closers == ()
