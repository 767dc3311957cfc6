"""Discord delivery benchmark: `python -m tests.bench.discord_bench` (part of `make bench`).

The real discord.py bot and the real core (SQLite, the instant FakeBackend) against the loopback fake
Discord of the tests, which enforces Discord's per-channel limits for bots (5 channel messages per
5 s, one reaction per 0.25 s; 429 with retry_after past them). Everything lands in ONE channel:

- `interactions`: N users' /imagine in a burst. The jobs are held until all N are queued, then
  released: results/s is N over the time from the release to the last result shown. Measured side
  by side with the fake's limits on and off, so the ratio says what Discord's limits cost the bot
  (1.0 = nothing). Results are edits of each interaction's own response (and carry buttons, no
  reactions), which the per-channel limits do not touch; the issue's goal is >= 10 results/s.
- `reactions`: M reactions on one result, each a job answered in the channel with the bot token (a
  status message, edited into the result): those are channel messages, so Discord's 5-per-5-s
  limit caps them at about one result per second. Shown for what it is, a platform cap.

Figures: results/s, the latency from release to each result (p50/p95), and the number of 429s and
of reactions the bot added (0: no hint reactions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import discord

from bot.backends.fake import FakeBackend
from tests.bench.stats import percentile
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config


@contextlib.asynccontextmanager
async def discord_fake(rate_limits: bool):
    fake = FakeDiscord(rate_limits=rate_limits)
    await fake.start()
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = fake.api_base  # type: ignore[misc]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = fake.gateway_url  # type: ignore[misc]
    try:
        yield fake
    finally:
        discord.http.Route.BASE = base  # type: ignore[misc]
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway  # type: ignore[misc]
        await fake.stop()


def config(tmp: Path, fake: FakeDiscord) -> dict[str, Any]:
    # Production throttles (one progress report per 2 s per job), a quota nobody reaches.
    return app_config(
        tmp,
        fake,
        bot={"progress_interval_s": 2.0, "dispatch_concurrency": 8, "max_queued_jobs": 10_000},
        quotas={"daily_limit": 100_000},
        discord={"progress_edit_interval_s": 2.0},
    )


async def interactions(n: int, rate_limits: bool) -> dict[str, Any]:
    async with discord_fake(rate_limits) as fake, _tmp() as tmp:
        users = [fake.user(f"user{i}") for i in range(20)]
        backend = FakeBackend()
        async with App(fake, config(tmp, fake), backend=backend):
            backend.hold()
            records = [
                fake.build_slash("imagine", users[i % 20], {"prompt": f"bench {i}", "steps": 2})
                for i in range(n)
            ]
            await fake.send_interactions(records)
            await fake.wait_for(lambda: all(r.texts() for r in records), within=120, what="every job queued")
            shown_at: dict[int, float] = {}
            released = time.monotonic()
            backend.release()

            def all_shown() -> bool:
                now = time.monotonic()
                for r in records:
                    if r.id not in shown_at and r.original is not None and r.original["attachments"]:
                        shown_at[r.id] = now
                return len(shown_at) == n

            await fake.wait_for(all_shown, within=600, what="every result")
            seconds = max(shown_at.values()) - released
            latencies = [t - released for t in shown_at.values()]
        return {
            "results": n,
            "seconds": seconds,
            "per_s": n / seconds,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "rate_limited": len(fake.rate_limited),
            "bot_reactions": len(fake.reactions),
        }


async def reactions(m: int) -> dict[str, Any]:
    async with discord_fake(True) as fake, _tmp() as tmp:
        alice = fake.user("alice")
        users = [fake.user(f"reactor{i}") for i in range(m)]
        async with App(fake, config(tmp, fake)) as app:
            rec = await fake.slash("imagine", alice, {"prompt": "the original", "steps": 2})
            original = await fake.wait_for(
                lambda: rec.original if rec.original and rec.original["attachments"] else None
            )
            for _ in range(600):  # reactions resolve through the result message, recorded when shown
                if await app.service.job_for_message("discord", original["id"]) is not None:
                    break
                await asyncio.sleep(0.05)
            started = time.monotonic()
            for user in users:
                await fake.react(int(original["id"]), "\U0001f501", user)
            await fake.wait_for(
                lambda: len([x for x in fake.channel_messages() if x["attachments"]]) == m,
                within=600,
                what="results",
            )
            seconds = time.monotonic() - started
        return {
            "results": m,
            "seconds": seconds,
            "per_s": m / seconds,
            "rate_limited": len(fake.rate_limited),
        }


@contextlib.asynccontextmanager
async def _tmp():
    with tempfile.TemporaryDirectory(prefix="discord-bench-") as d:
        yield Path(d)


async def main(n: int, m: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("discord").setLevel(logging.ERROR)  # 429s are expected in the reactions run
    print(f"Discord delivery into one channel: {n} /imagine results (20 users), instant backend, SQLite")
    limited = await interactions(n, rate_limits=True)
    free = await interactions(n, rate_limits=False)
    for name, r in (("with Discord's limits", limited), ("without limits", free)):
        print(
            f"  {name:22s} {r['per_s']:6.1f} results/s ({r['results']} in {r['seconds']:.1f} s; latency p50 "
            f"{r['p50']:.1f} s, p95 {r['p95']:.1f} s); 429s: {r['rate_limited']}; reactions added: {r['bot_reactions']}"
        )
    print(f"  ratio with/without limits: {limited['per_s'] / free['per_s']:.2f}")
    r = await reactions(m)
    print(
        f"{m} re-rolls by reaction, answered in the channel (bot-token messages, capped by Discord at 5 per 5 s): "
        f"{r['per_s']:.2f} results/s ({r['seconds']:.1f} s); 429s: {r['rate_limited']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=int, default=200, help="results of the burst (default 200)")
    parser.add_argument("--reactions", type=int, default=15, help="reaction jobs (default 15)")
    args = parser.parse_args()
    asyncio.run(main(args.results, args.reactions))
