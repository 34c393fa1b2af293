"""Clients as real traffic has them: ones that leave before their answer ends."""

from __future__ import annotations

from typing import Any

import aiohttp


class AnsweredBeforeLeaving(AssertionError):
    """The answer ended before the client meant to leave: the test's answer is too short."""


async def leave_after(url: str, body: dict[str, Any], seconds: float, key: str = "") -> None:
    """POST `body` to the chat route at `url`, read, and go away after `seconds` (the
    connection closes) before the answer ends."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
        except TimeoutError:
            return
    raise AnsweredBeforeLeaving(f"the answer ended within {seconds}s, before its client left")
