#!/usr/bin/env python3
"""Read twinflow's output topics the way an ML or ERP consumer would.

Uses only off-the-shelf clients (confluent-kafka, fastavro) and the Avro
schemas shipped in schemas/: no twinflow code. Values are plain Avro binary
datums (no Confluent Schema Registry header); keys are UTF-8 asset ids.

Prints one JSON document on stdout:

    {"changelog_records": n, "alert_records": m,
     "twins": {asset_id: <last twin of that asset, by offset>},
     "changelog": [{"partition", "offset", "asset_id", "version"}, ...],
     "alerts": [<alert event + "partition", "offset">, ...]}

Lists are in (partition, offset) order. timestamp-millis values are printed
as integer epoch milliseconds; enums as their symbols. A changelog tombstone
(null value) is listed with "version": null and "tombstone": true and removes
the asset from "twins".

Reading goes on until both expected counts are reached. Records of a topic
that already reached its count are still kept when they arrive meanwhile, so
a reported count above the expectation means the topic holds more records.

Exit codes: 0 ok; 1 usage or schema error; 2 the expected record counts were
not reached before --timeout; 3 a record key did not equal its asset_id;
4 a value could not be decoded with the given schema.
"""

import argparse
import datetime as dt
import io
import json
import sys
import time
import uuid

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MILLI = dt.timedelta(milliseconds=1)


def fail(code, message):
    print(f"read_outputs: {message}", file=sys.stderr)
    sys.exit(code)


def to_plain(value):
    """Recursively turn decoded Avro values into JSON-ready ones."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return (value - EPOCH) // MILLI
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return value


def load_schema(path):
    try:
        with open(path, encoding="utf-8") as f:
            return fastavro.parse_schema(json.load(f))
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as e:
        fail(1, f"cannot load schema {path}: {e}")


def decode(schema, msg, older_schema=False):
    data = msg.value()
    buf = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buf, schema)
    except Exception as e:  # fastavro raises various types on bad data
        fail(4, f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: cannot decode value: {e!r}")
    # A reader on an older schema than the writer's: fields appended since follow the
    # datum and are ignored, as fastavro's schemaless_reader itself does.
    if buf.tell() != len(data) and not older_schema:
        fail(
            4,
            f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: value has "
            f"{len(data) - buf.tell()} trailing bytes after the Avro datum",
        )
    return to_plain(record)


def decode_key(msg):
    key = msg.key()
    if key is None:
        fail(3, f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: record has no key")
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        fail(3, f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: key is not UTF-8: {key!r}")


def wait_for_partitions(consumer, topic, deadline):
    """Partition ids of `topic`, waiting (until deadline) for it to exist."""
    last_error = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            md = consumer.list_topics(topic, timeout=max(0.1, min(5.0, remaining)))
            t = md.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                return sorted(t.partitions)
            last_error = t.error if t is not None else "not in metadata"
        except Exception as e:  # KafkaException on timeouts / transport errors
            last_error = e
        if time.monotonic() >= deadline:
            fail(2, f"timeout: topic {topic!r} not available ({last_error})")
        time.sleep(0.2)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="HOST:PORT of a broker")
    p.add_argument("--changelog", required=True, help="twin changelog topic")
    p.add_argument("--alerts", required=True, help="alert topic")
    p.add_argument("--twin-schema", required=True, help="e.g. schemas/vehicle_twin.avsc")
    p.add_argument("--alert-schema", required=True, help="e.g. schemas/alert_event.avsc")
    p.add_argument("--expect-changelog", type=int, required=True, metavar="N",
                   help="stop once N changelog records were read")
    p.add_argument("--expect-alerts", type=int, required=True, metavar="N",
                   help="stop once N alert records were read")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up (exit 2) when the counts are not reached by then (default 60)")
    p.add_argument("--isolation", choices=["read_committed", "read_uncommitted"],
                   default="read_committed", help="default read_committed")
    p.add_argument("--older-schema", action="store_true",
                   help="the schemas given may be older than the writer's: ignore the bytes of "
                        "fields appended since (otherwise trailing bytes are an error)")
    args = p.parse_args()
    if args.expect_changelog < 0 or args.expect_alerts < 0:
        p.error("expected counts must be >= 0")
    return args


def main():
    args = parse_args()
    deadline = time.monotonic() + args.timeout
    twin_schema = load_schema(args.twin_schema)
    alert_schema = load_schema(args.alert_schema)

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": f"twinflow-read-outputs-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": args.isolation,
        # Some test brokers ignore fetch size limits and answer with the whole
        # backlog; without this librdkafka drops such responses and retries forever.
        "receive.message.max.bytes": 2147483647,
        "fetch.wait.max.ms": 10,
    })

    # Read every partition from the beginning by assignment: no group
    # rebalance to wait for, and nothing committed.
    assignment = []
    for topic in (args.changelog, args.alerts):
        for p in wait_for_partitions(consumer, topic, deadline):
            assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
    consumer.assign(assignment)

    changelog = []  # (partition, offset, asset_id, twin or None for a tombstone)
    alerts = []     # (partition, offset, alert)
    last_error = None
    try:
        while len(changelog) < args.expect_changelog or len(alerts) < args.expect_alerts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f"; last client error: {last_error}" if last_error else ""
                fail(
                    2,
                    f"timeout after {args.timeout:g} s: read {len(changelog)} of "
                    f"{args.expect_changelog} changelog records ({args.changelog}) and "
                    f"{len(alerts)} of {args.expect_alerts} alert records ({args.alerts}){detail}",
                )
            msg = consumer.poll(min(0.5, remaining))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    last_error = msg.error()
                    print(f"read_outputs: client error: {last_error}", file=sys.stderr)
                continue
            key = decode_key(msg)
            where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            if msg.topic() == args.changelog:
                if msg.value() is None:  # compaction tombstone
                    changelog.append((msg.partition(), msg.offset(), key, None))
                    continue
                twin = decode(twin_schema, msg, args.older_schema)
                if twin["asset_id"] != key:
                    fail(3, f"{where}: key {key!r} != asset_id {twin['asset_id']!r}")
                changelog.append((msg.partition(), msg.offset(), key, twin))
            else:
                if msg.value() is None:
                    fail(4, f"{where}: alert record has no value")
                alert = decode(alert_schema, msg)
                if alert["asset_id"] != key:
                    fail(3, f"{where}: key {key!r} != asset_id {alert['asset_id']!r}")
                alerts.append((msg.partition(), msg.offset(), alert))
    finally:
        consumer.close()

    changelog.sort(key=lambda r: (r[0], r[1]))
    alerts.sort(key=lambda r: (r[0], r[1]))

    twins = {}
    changelog_out = []
    for partition, offset, asset_id, twin in changelog:
        entry = {"partition": partition, "offset": offset, "asset_id": asset_id,
                 "version": twin["version"] if twin is not None else None}
        if twin is None:
            entry["tombstone"] = True
            twins.pop(asset_id, None)
        else:
            twins[asset_id] = twin
        changelog_out.append(entry)

    alerts_out = [dict(alert, partition=partition, offset=offset)
                  for partition, offset, alert in alerts]

    json.dump({
        "changelog_records": len(changelog),
        "alert_records": len(alerts),
        "twins": twins,
        "changelog": changelog_out,
        "alerts": alerts_out,
    }, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
