"""MESSAGE: refuse a message larger than the tenant's own size limit.

The node enforces `[inbound] max_message_size` for everyone while the data arrives;
a tenant may choose a smaller limit (policy key `max_message_size`, in bytes). It is
decided per tenant after the data is in, so in a transaction shared by several tenants
only the tenant with the smaller limit refuses its copy.
"""

from __future__ import annotations

from typing import ClassVar

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict


class TenantSizeLimit:
    name: ClassVar[str] = "size_limit"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = 1.0
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        if ctx.tenant is None or ctx.message is None:
            ctx.note(Outcome.SKIP, "no tenant")
            return CONTINUE
        limit = ctx.tenant.policy.get("max_message_size")
        if not isinstance(limit, int) or limit <= 0:
            ctx.note(Outcome.SKIP, "no tenant limit")
            return CONTINUE
        if ctx.message.size <= limit:
            ctx.note(Outcome.PASS, f"{ctx.message.size} <= {limit}")
            return CONTINUE
        ctx.note(Outcome.FAIL, f"{ctx.message.size} > {limit}")
        return Verdict(
            Action.REJECT,
            Reply(552, "5.3.4", "Message too big for recipient"),
            reason=f"message of {ctx.message.size} bytes over tenant limit {limit}",
        )
