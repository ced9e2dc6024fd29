#!/usr/bin/env python3
"""Chat through HAProxy across a restart, as scripts/compose-test does it.

  scripts/compose-chat.py --base http://127.0.0.1:8080 --restart-cmd 'docker-compose ... restart {node}'

1. alice and bob join the room over ws://.../ws and land on different nodes (the
   welcome frame's `node`); bob reconnects, a bounded number of times, until they do.
2. alice sends a message: she gets its ack, bob gets the message.
3. The restart command runs for bob's node (`{node}` is replaced by its id, which
   docker-compose.yml sets to the service name). bob must be closed with 1012 (the
   node drains on SIGTERM), reconnect at once as the chat page does, land on
   another node, and chat again both ways.
4. Once the restart command is done, /cluster must list three nodes again, and
   a third client, carol, must land on the restarted node and chat with bob.

Prints one line per step, and a timing for each; exits non-zero on the first
failure. Needs the `websockets` package (Debian: python3-websockets).
"""

import argparse
import asyncio
import json
import shlex
import sys
import time
import urllib.request

import websockets

ROOM = "lobby"
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Fail(Exception):
    pass


def ws_url(base, user):
    return base.replace("http://", "ws://", 1) + f"/ws?room={ROOM}&user={user}"


def get_json(base, path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return r.status, json.loads(r.read())


async def connect(base, user, attempts=20):
    """Open a session; retry refusals (503 while a node drains, 409 while an id is
    still held) a bounded number of times. Returns (ws, welcome)."""
    last = None
    for i in range(attempts):
        try:
            ws = await websockets.connect(ws_url(base, user), open_timeout=10, close_timeout=5)
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") != "welcome":
                raise Fail(f"{user}: first frame is not welcome: {frame}")
            return ws, frame
        except (OSError, asyncio.TimeoutError, websockets.exceptions.InvalidHandshake,
                websockets.exceptions.ConnectionClosed) as e:
            last = e
            await asyncio.sleep(min(0.2 * (i + 1), 1.0))
    raise Fail(f"{user}: could not connect after {attempts} attempts: {last!r}")


async def wait_frame(ws, who, pred, what, timeout=10):
    """Read frames until pred(frame); others (presence, own echoes) are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Fail(f"{who}: no {what} within {timeout}s")
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            raise Fail(f"{who}: no {what} within {timeout}s") from None
        frame = json.loads(raw)
        if pred(frame):
            return frame


async def chat(sender, s_name, receiver, r_name, text, ref):
    t = time.monotonic()
    await sender.send(json.dumps({"type": "message", "text": text, "ref": ref}))
    ack = wait_frame(sender, s_name, lambda f: f.get("type") == "ack" and f.get("ref") == ref,
                     f"ack for {ref}")
    got = wait_frame(receiver, r_name,
                     lambda f: f.get("type") == "message" and f.get("text") == text,
                     f"message {text!r}")
    ack, got = await asyncio.gather(ack, got)
    if got.get("from") != s_name:
        raise Fail(f"{r_name}: message from {got.get('from')!r}, expected {s_name!r}")
    log(f"{s_name} -> {r_name}: {text!r} delivered (ack id {ack.get('id')}, "
        f"{(time.monotonic() - t) * 1000:.0f} ms)")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--restart-cmd", required=True,
                    help="shell command; {node} is replaced by the node to restart")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--drain-timeout", type=float, default=60,
                    help="seconds to wait for the 1012 close")
    args = ap.parse_args()
    base = args.base.rstrip("/")

    # 1. Two clients on two nodes.
    alice, wa = await connect(base, "alice")
    log(f"alice joined {ROOM} on {wa['node']}")
    bob, wb = await connect(base, "bob")
    tries = 1
    while wb["node"] == wa["node"]:
        if tries >= 10:
            raise Fail(f"bob landed on alice's node {wa['node']} {tries} times in a row")
        log(f"bob landed on {wb['node']} too; reconnecting")
        await bob.close()
        bob, wb = await connect(base, "bob")
        tries += 1
    log(f"bob joined {ROOM} on {wb['node']} (after {tries} connection(s))")

    # 2. A message across nodes.
    await chat(alice, "alice", bob, "bob", "hello", "c1")
    await chat(bob, "bob", alice, "alice", "hello alice", "c2")

    # 3. Restart bob's node while both stay connected.
    node = wb["node"]
    cmd = args.restart_cmd.replace("{node}", shlex.quote(node))
    log(f"restarting {node}: {cmd}")
    t_restart = time.monotonic()
    proc = await asyncio.create_subprocess_shell(cmd)

    async def drain_alice():
        # Keep alice's side read (pings are answered in the background anyway).
        try:
            while True:
                await alice.recv()
        except websockets.exceptions.ConnectionClosed as e:
            raise Fail(f"alice was closed during bob's node restart: {e}") from None

    alice_task = asyncio.ensure_future(drain_alice())
    code = reason = None
    try:
        deadline = time.monotonic() + args.drain_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail(f"bob was not closed within {args.drain_timeout}s of the restart")
            try:
                await asyncio.wait_for(bob.recv(), left)
            except asyncio.TimeoutError:
                continue
            except websockets.exceptions.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                reason = e.rcvd.reason if e.rcvd else None
                break
    finally:
        alice_task.cancel()
    t_closed = time.monotonic()
    log(f"bob closed by {node} with {code} {reason!r} "
        f"{t_closed - t_restart:.1f}s after the restart began")
    if code != 1012:
        raise Fail(f"bob's close code is {code}, expected 1012")

    # Reconnect at once, as static/ does on 1012.
    bob, wb2 = await connect(base, "bob")
    log(f"bob reconnected on {wb2['node']} in {(time.monotonic() - t_closed) * 1000:.0f} ms")
    if wb2["node"] == node:
        raise Fail(f"bob came back on the draining node {node}")
    await chat(alice, "alice", bob, "bob", "hello again", "c3")
    await chat(bob, "bob", alice, "alice", "back on " + wb2["node"], "c4")

    rc = await proc.wait()
    t_done = time.monotonic()
    log(f"restart command exited {rc} after {t_done - t_restart:.1f}s")
    if rc != 0:
        raise Fail(f"restart command failed with exit code {rc}")

    # 4. The restarted node is back in the cluster.
    deadline = time.monotonic() + 60
    ids = []
    while time.monotonic() < deadline:
        try:
            _, body = get_json(base, "/cluster")
            ids = sorted(n["id"] for n in body["nodes"])
            if len(ids) == args.nodes and node in ids:
                break
        except OSError:
            pass
        await asyncio.sleep(0.5)
    else:
        raise Fail(f"/cluster lists {ids}, expected {args.nodes} nodes including {node}")
    log(f"/cluster lists {ids} again, {time.monotonic() - t_restart:.1f}s after the restart began")

    # 5. The restarted node takes new users again: carol connects until HAProxy
    # sends her there (the node must first pass RISE health checks).
    deadline = time.monotonic() + 60
    tries = 0
    while True:
        carol, wc = await connect(base, "carol")
        tries += 1
        if wc["node"] == node:
            break
        await carol.close()
        if time.monotonic() > deadline:
            raise Fail(f"no connection landed on the restarted {node} within 60s ({tries} tries)")
        await asyncio.sleep(0.5)
    log(f"carol joined on the restarted {node} after {tries} connection(s), "
        f"{time.monotonic() - t_restart:.1f}s after the restart began")
    await chat(carol, "carol", bob, "bob", "hello from " + node, "c5")

    await alice.close()
    await bob.close()
    await carol.close()
    log("chat test passed")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Fail as e:
        log(f"FAIL: {e}")
        sys.exit(1)
