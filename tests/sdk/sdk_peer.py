"""A peer agent written with the official AgentChat Python SDK (agentchatme).

It registers itself on the server through register + verify, listens with the SDK's
RealtimeClient, sends COUNT messages to the daemon's agent and expects COUNT replies in order.
Then, with its socket closed, it sends OFFLINE more messages and collects the replies through
sync + sync_ack, as the SDK's offline drain does. Any deviation is a failure: exit code 1 and
a reason on stderr. On success it prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from agentchatme import AsyncAgentChatClient, RealtimeClient


def fail(reason: str) -> None:
    print(f"sdk peer: {reason}", file=sys.stderr)
    sys.exit(1)


async def wait_until(predicate, timeout_s: float) -> bool:
    """Polls predicate every 50 ms, at most timeout_s."""
    steps = int(timeout_s / 0.05)
    for _ in range(steps):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def run(args: argparse.Namespace) -> dict:
    pending = await AsyncAgentChatClient.register(
        email="sdk-peer@example.test", handle=args.handle, base_url=args.api_base
    )
    _, api_key, client = await AsyncAgentChatClient.verify(
        pending["pending_id"], args.code, base_url=args.api_base
    )
    me = await client.get_me()
    if me.get("handle") != args.handle:
        fail(f"get_me returned {me!r}")

    replies: list[dict] = []

    async def on_message(frame: dict) -> None:
        message = frame.get("payload") or {}
        if message.get("sender") == args.agent:
            replies.append(message)

    realtime = RealtimeClient(api_key=api_key, base_url=args.ws_base, client=client)
    realtime.on("message.new", on_message)
    await realtime.connect()
    # A new thread takes one message until the other side answers (the cold-thread rule), so
    # the first message waits for its reply and the rest follow at once.
    for i in range(args.count):
        await client.send_message(to=f"@{args.agent}", text=f"sdk {i}", client_msg_id=f"sdk-{i}")
        if i == 0 and not await wait_until(lambda: len(replies) >= 1, args.timeout):
            fail("no reply to the first message")
    if not await wait_until(lambda: len(replies) >= args.count, args.timeout):
        fail(f"expected {args.count} live replies, got {len(replies)}")
    texts = [m.get("content", {}).get("text") for m in replies[: args.count]]
    expected = [f"echo: sdk {i}" for i in range(args.count)]
    if texts != expected:
        fail(f"live replies out of order or wrong: {texts!r}")
    seqs = [m["seq"] for m in replies[: args.count]]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        fail(f"live reply seqs not strictly increasing: {seqs!r}")
    await asyncio.sleep(0.3)
    if len(replies) != args.count:
        fail(f"extra live replies arrived: {len(replies)}")
    await realtime.disconnect()

    # Everything delivered live was acked over the socket, so nothing is left to sync.
    leftover = await client.sync(limit=100)
    if leftover:
        fail(f"{len(leftover)} live messages were still undelivered after the realtime phase")

    for i in range(args.offline):
        await client.send_message(
            to=f"@{args.agent}", text=f"offline {i}", client_msg_id=f"sdk-offline-{i}"
        )
    rows: list[dict] = []

    async def fetch() -> None:
        page = await client.sync(limit=100)
        rows.clear()
        rows.extend(page)

    for _ in range(int(args.timeout / 0.1)):
        await fetch()
        if len(rows) >= args.offline:
            break
        await asyncio.sleep(0.1)
    texts = [r.get("content", {}).get("text") for r in rows]
    expected = [f"echo: offline {i}" for i in range(args.offline)]
    if texts != expected:
        fail(f"offline replies through sync: {texts!r}")
    ack = await client.sync_ack(rows[-1]["delivery_id"])
    if ack.get("acked") != args.offline:
        fail(f"sync_ack acked {ack!r}, expected {args.offline}")
    if await client.sync(limit=100):
        fail("sync still returned rows after sync_ack")
    await client.aclose()
    return {"live_replies": args.count, "offline_replies": args.offline, "acked": ack["acked"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--ws-base", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--code", required=True)
    parser.add_argument("--handle", default="sdk-peer")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--offline", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    summary = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout * 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
