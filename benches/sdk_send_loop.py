"""The official Python SDK's own send loop, for the outbox pacing benchmark.

For SECS seconds, one agent sends as fast as the SDK lets it, round-robin over the given peers
(each has written first, so every thread is established), relying on the SDK's built-in retry
policy for 429 answers. Prints a JSON summary: messages sent, sends per second and errors
that reached the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from agentchatme import AgentChatError, AsyncAgentChatClient


async def run(args: argparse.Namespace) -> dict:
    peers = args.peers.split(",")
    client = AsyncAgentChatClient(api_key=args.key, base_url=args.api_base)
    sent = errors = n = 0
    started = time.monotonic()
    deadline = started + args.secs
    while time.monotonic() < deadline and n < 10_000_000:
        peer = peers[n % len(peers)]
        n += 1
        try:
            await client.send_message(to=f"@{peer}", text=f"reply {n}")
            sent += 1
        except AgentChatError:
            errors += 1
    elapsed = time.monotonic() - started
    await client.aclose()
    return {"sent": sent, "per_second": sent / elapsed, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secs", type=float, default=60)
    parser.add_argument("--peers", required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
