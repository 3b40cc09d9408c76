"""MQTT devices for the bridge tests, on paho-mqtt (a client twinflow does not write).

publish: sends the messages of a JSON-lines file ({"topic": ..., "payload": "<text>"} or
  {"topic": ..., "payload_hex": "<hex>"}) at QoS 1 from --clients connections (each topic's
  messages from one connection, in file order), waits for every PUBACK, and prints
  {"published": n, "refused": [line numbers the broker refused or dropped the connection on]}.
obey: devices that keep a persistent session (clean start off), subscribe to their command
  topics, and for each command print it (with its MQTT 5 message expiry) as a JSON line,
  acknowledge it on <command topic>/ack and report the commanded values as a reading on
  assets/<id>/telemetry (at --event-time, else now). Stops after --count commands or
  --seconds. A command may arrive (from the session) before the line {"ready": true}.
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def client(client_id, port, clean_start=True, dropped=None):
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)
    if not clean_start:
        props.SessionExpiryInterval = 3600
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    if dropped is not None:
        c.on_disconnect = lambda *a: dropped.set()
    c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
    c.loop_start()
    if not connected.wait(20):
        sys.exit(f"{client_id}: not connected within 20 s")
    return c


def publish(args):
    lines = [json.loads(l) for l in open(args.file) if l.strip()]
    by_client = [[] for _ in range(args.clients)]
    for n, m in enumerate(lines):
        by_client[hash(m["topic"]) % args.clients].append((n, m))
    refused = []
    lock = threading.Lock()

    def run(i, messages):
        if not messages:
            return
        dropped = threading.Event()
        c = client(f"device-{args.tag}-{i}", args.port, dropped=dropped)
        pending = []
        for n, m in messages:
            payload = bytes.fromhex(m["payload_hex"]) if "payload_hex" in m else m["payload"].encode()
            info = c.publish(m["topic"], payload, qos=1)
            pending.append((n, info))
            if len(pending) >= 500:
                settle(pending, dropped)
        settle(pending, dropped)
        c.disconnect()
        c.loop_stop()

    def settle(pending, dropped):
        # A broker that refuses a message (too large) drops the connection: whatever is
        # unacknowledged then counts as refused.
        deadline = time.monotonic() + 60
        for n, info in pending:
            while not info.is_published() and not dropped.is_set() and time.monotonic() < deadline:
                try:
                    info.wait_for_publish(timeout=0.1)
                except (RuntimeError, ValueError):
                    break
            if not info.is_published():
                with lock:
                    refused.append(n)
        pending.clear()

    threads = [threading.Thread(target=run, args=(i, ms)) for i, ms in enumerate(by_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"published": len(lines) - len(refused), "refused": sorted(refused)}), flush=True)


def obey(args):
    assets = args.assets.split(",")
    done = threading.Event()
    seen = [0]
    sent = []
    lock = threading.Lock()

    def on_message(c, _userdata, msg):
        asset = msg.topic.split("/")[1]
        command = json.loads(msg.payload)
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        with lock:
            print(json.dumps({"topic": msg.topic, "command": command, "expiry": expiry}), flush=True)
        ack = {"command_id": command["command_id"], "result": "accepted"}
        reading = dict(command["values"])
        reading["event_time"] = args.event_time or int(time.time() * 1000)
        with lock:
            sent.append(c.publish(msg.topic + "/ack", json.dumps(ack), qos=1))
            sent.append(c.publish(f"assets/{asset}/telemetry", json.dumps(reading), qos=1))
            seen[0] += 1
            if seen[0] >= args.count:
                done.set()

    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"device-{args.tag}",
        protocol=mqtt.MQTTv5,
    )
    subscribed = threading.Event()
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", args.port, keepalive=30, clean_start=False, properties=props)
    for a in assets:
        c.subscribe(f"assets/{a}/commands", qos=1)
    c.loop_start()
    if not subscribed.wait(20):
        sys.exit("not subscribed within 20 s")
    print(json.dumps({"ready": True}), flush=True)
    if args.count > 0:
        done.wait(args.seconds)
    with lock:
        for info in sent:
            info.wait_for_publish(timeout=20)
    c.disconnect()
    c.loop_stop()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--file", required=True)
    pub.add_argument("--clients", type=int, default=4)
    pub.add_argument("--tag", default="p")
    ob = sub.add_parser("obey")
    ob.add_argument("--port", type=int, required=True)
    ob.add_argument("--assets", required=True)
    ob.add_argument("--count", type=int, default=1)
    ob.add_argument("--seconds", type=float, default=30)
    ob.add_argument("--tag", default="o")
    ob.add_argument("--event-time", type=int, default=0, help="the readings' event time (ms)")
    args = p.parse_args()
    {"publish": publish, "obey": obey}[args.cmd](args)


if __name__ == "__main__":
    main()
