"""Smoke test of the local server with the official Python SDK (agentchatme 1.1.1), unchanged.

Usage: python tests/sdk/smoke_server.py http://127.0.0.1:PORT

Registers two agents through the e-mail/OTP flow (dev code), sends messages, receives them
with the SDK's RealtimeClient (drain on connect in ack mode, then live), and drains the rest
with sync + sync_ack. Exits 0 when every check passes, 1 otherwise.
"""

import asyncio
import sys
import uuid

from agentchatme import AgentChatClient, AsyncAgentChatClient, RealtimeClient

DEV_CODE = "424242"


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        raise SystemExit(1)


def register(base, handle):
    pending = AgentChatClient.register(
        email=f"{handle}@example.com", handle=handle, base_url=base
    )
    agent, key, client = AgentChatClient.verify(pending["pending_id"], DEV_CODE, base_url=base)
    check(agent.get("handle") == handle and key.startswith("ac_"), f"registered @{handle}")
    return key, client


async def wait_for(pred, seconds=5.0):
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def main(base):
    ws_base = "ws" + base[len("http"):]
    suffix = uuid.uuid4().hex[:6]
    alice_h, bob_h = f"alice{suffix}", f"bob{suffix}"
    alice_key, alice = register(base, alice_h)
    bob_key, bob = register(base, bob_h)

    # Sent while Bob is offline: must arrive through the drain on connect.
    first = alice.send_message(to=f"@{bob_h}", text="sent while you were offline")
    check(first.message["seq"] == 1, "first send stored with seq 1")
    replay = alice.send_message(
        to=bob_h, text="retry", client_msg_id=first.message["client_msg_id"]
    )
    check(replay.message == first.message, "same client_msg_id replays the original")

    received = []
    connected = []
    # No REST client on the realtime side: the SDK's own REST drain stays off, so the offline
    # message can only arrive through the server's drain on connect.
    rt = RealtimeClient(api_key=bob_key, base_url=ws_base, reconnect=False)
    rt.on("message.new", lambda frame: received.append(frame["payload"]))
    rt.on_connect(lambda: connected.append(True))
    errors = []
    rt.on_error(lambda err: errors.append(err))
    await rt.connect()
    check(await wait_for(lambda: connected), "realtime client got hello.ok")
    check(rt._ack_mode, "server accepted the ack capability")
    check(
        await wait_for(lambda: any(m["id"] == first.message["id"] for m in received)),
        "offline message delivered by the server's drain on connect",
    )

    # Bob answers, which establishes the thread so Alice may send again.
    bob.send_message(to=alice_h, text="hi alice")
    live = alice.send_message(to=bob_h, text="live message")
    check(
        await wait_for(lambda: any(m["id"] == live.message["id"] for m in received)),
        "live message pushed over the socket",
    )
    check(live.message["seq"] == 3, "seq continues across both senders")
    check(await wait_for(lambda: bob.sync() == []), "ws ack frames left nothing to sync")
    await rt.disconnect()

    # The SDK's REST drain (auto-drain on hello.ok when a REST client is attached).
    pending = alice.send_message(to=bob_h, text="drained over REST").message
    drained = []
    bob_async = AsyncAgentChatClient(api_key=bob_key, base_url=base)
    rt = RealtimeClient(api_key=bob_key, base_url=ws_base, client=bob_async, reconnect=False)
    rt.on("message.new", lambda frame: drained.append(frame["payload"]))
    rt.on_error(lambda err: errors.append(err))
    await rt.connect()
    check(
        await wait_for(lambda: any(m["id"] == pending["id"] for m in drained)),
        "message pending at connect delivered once connected with a REST client",
    )
    check(await wait_for(lambda: bob.sync() == []), "nothing left to sync after that drain")
    await rt.disconnect()
    await bob_async.aclose()

    # Offline again: drain by hand with sync + sync_ack.
    later = [alice.send_message(to=bob_h, text=f"later {i}").message for i in range(3)]
    rows = bob.sync(limit=2)
    check([r["id"] for r in rows] == [m["id"] for m in later[:2]], "sync page of 2 in order")
    rest = bob.sync(after=rows[-1]["delivery_id"])
    check([r["id"] for r in rest] == [later[2]["id"]], "sync after cursor returns the rest")
    acked = bob.sync_ack(rest[-1]["delivery_id"])
    check(acked == {"acked": 3}, f"sync_ack acked every row ({acked})")
    check(bob.sync() == [], "nothing left after ack")

    history = bob.get_messages(first.message["conversation_id"], after_seq=0, limit=10)
    check([m["seq"] for m in history] == [1, 2, 3, 4, 5, 6, 7], "history after_seq in order")

    try:
        alice.send_message(to="nobody-here", text="x")
        check(False, "unknown recipient refused")
    except Exception as err:  # noqa: BLE001 - the SDK's own error class is what we print
        check(getattr(err, "code", None) == "AGENT_NOT_FOUND", f"unknown recipient: {err!r}")

    check(not errors, f"realtime client reported no errors ({errors})")
    alice.close()
    bob.close()
    print("smoke test passed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        raise SystemExit(2)
    asyncio.run(main(sys.argv[1].rstrip("/")))
