#!/usr/bin/env python3
"""Produce and consume Confluent-framed Avro the way any Confluent client would.

Uses only confluent-kafka's own `AvroSerializer` and `AvroDeserializer` with a
Schema Registry (the real one, or tests/python/registry.py): no twinflow code.
Values are in the Confluent wire format (magic byte 0, the 4-byte big-endian
schema id, then the Avro binary datum); keys are plain UTF-8 asset ids, as
`StringSerializer` writes them.

    confluent_io.py produce --bootstrap B --registry URL --topic T
                            --schema FILE.avsc --input FILE.jsonl
    confluent_io.py consume --bootstrap B --registry URL --topic T --expect N

Both take --registry-user NAME:PASSWORD (HTTP basic auth) and -X KEY=VALUE
(repeatable) for extra librdkafka settings; receive.message.max.bytes defaults
to 2147483647, since some test brokers ignore fetch size limits.

produce: each non-empty input line is one JSON object, the record value. It is
serialized with the schema given (registered under T-value if it is not there
yet: auto.register.schemas) and keyed by its "asset_id". timestamp-millis
fields are given as integer epoch milliseconds. Every record must be delivered.
Prints one JSON line:

    {"produced": n, "schema_id": id}     (schema_id null when the input is empty)

consume: reads every partition of T from the beginning, by assignment (a
random group id, nothing committed), until N records were read, and decodes
each value with the writer schema its id names in the registry. Prints one
JSON document:

    {"records": [{"partition", "offset", "key", "schema_id", "value"}, ...]}

in (partition, offset) order. timestamp-millis values are printed as integer
epoch milliseconds; enums as their symbols. A record without a value (a
tombstone) has "value" and "schema_id" null; one without a key, "key" null.
Reading stops at N records, so more may exist.

Exit codes: 0 ok; 1 usage, input or schema error, or a value the serializer
rejects; 2 timeout (consume: fewer than N records by --timeout; produce: not
everything delivered by --timeout); 3 a delivery report with an error
(produce); 4 a record that cannot be decoded: a value not starting with magic
byte 0, an Avro datum that does not match its schema, a key that is not UTF-8
(consume); 5 the schema registry refused a request (e.g. 401 for missing
credentials, 404 for an unknown schema id, 422 for an invalid schema) or could
not be reached.
"""

import argparse
import json
import struct
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from read_outputs import to_plain  # beside this file: the same JSON form of Avro values

try:  # the HTTP client confluent-kafka's registry client uses, for its transport errors
    import httpx2 as _http
except ImportError:  # pragma: no cover - older confluent-kafka releases use httpx
    import httpx as _http

MAGIC_BYTE = 0
REGISTRY_UNREACHABLE = (_http.TransportError,)


def fail(code, message):
    print(f"confluent_io: {message}", file=sys.stderr)
    sys.exit(code)


def registry_client(args):
    conf = {"url": args.registry}
    if args.registry_user is not None:
        conf["basic.auth.user.info"] = args.registry_user
    return SchemaRegistryClient(conf)


def kafka_config(args, **defaults):
    conf = {
        "bootstrap.servers": args.bootstrap,
        # Some test brokers ignore fetch size limits and answer with the whole
        # backlog; without this librdkafka drops such responses and retries forever.
        "receive.message.max.bytes": 2147483647,
    }
    conf.update(defaults)
    for item in args.X:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(1, f"-X {item!r}: expected KEY=VALUE")
        conf[key] = value
    return conf


def registry_failure(what, e):
    if isinstance(e, SchemaRegistryError):
        fail(5, f"{what}: the schema registry answered HTTP {e.http_status_code} "
                f"(error code {e.error_code}): {e.error_message}")
    fail(5, f"{what}: cannot reach the schema registry: {e!r}")


# --- produce -------------------------------------------------------------------

def read_input(path):
    """[(line number, object)] of the JSON lines in `path`."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    fail(1, f"{path}:{number}: not JSON: {e}")
                if not isinstance(obj, dict):
                    fail(1, f"{path}:{number}: not a JSON object")
                if not isinstance(obj.get("asset_id"), str):
                    fail(1, f"{path}:{number}: no string asset_id to key the record with")
                records.append((number, obj))
    except (OSError, UnicodeDecodeError) as e:
        fail(1, f"cannot read {path}: {e}")
    return records


def produce(args):
    try:
        with open(args.schema, encoding="utf-8") as f:
            schema_text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(1, f"cannot read schema {args.schema}: {e}")
    records = read_input(args.input)
    try:
        serializer = AvroSerializer(registry_client(args), schema_text,
                                    conf={"auto.register.schemas": True})
    except Exception as e:  # fastavro / json errors for a bad schema file
        fail(1, f"schema {args.schema}: {e}")

    producer = Producer(kafka_config(args, **{"linger.ms": 5}))
    ctx = SerializationContext(args.topic, MessageField.VALUE)
    errors = []
    delivered = [0]

    def on_delivery(err, msg):
        if err is not None:
            errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
        else:
            delivered[0] += 1

    schema_id = None
    for number, obj in records:
        where = f"{args.input}:{number}"
        try:
            value = serializer(obj, ctx)
        except SchemaRegistryError as e:
            registry_failure(where, e)
        except REGISTRY_UNREACHABLE as e:
            registry_failure(where, e)
        except Exception as e:  # fastavro raises various types for a value off its schema
            fail(1, f"{where}: cannot serialize with {args.schema}: {e!r}")
        schema_id = struct.unpack(">I", value[1:5])[0]
        while True:
            try:
                producer.produce(args.topic, key=obj["asset_id"].encode("utf-8"), value=value,
                                 on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.1)
        producer.poll(0)

    remaining = producer.flush(args.timeout)
    if errors:
        fail(3, f"{len(errors)} record(s) not delivered, first: {errors[0]}")
    if remaining or delivered[0] != len(records):
        fail(2, f"timeout after {args.timeout:g} s: {delivered[0]} of {len(records)} "
                f"records delivered")
    json.dump({"produced": delivered[0], "schema_id": schema_id}, sys.stdout)
    sys.stdout.write("\n")


# --- consume -------------------------------------------------------------------

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


def decode(deserializer, msg):
    """The record as printed: partition, offset, key, schema_id, value."""
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    key = msg.key()
    if key is not None:
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            fail(4, f"{where}: key is not UTF-8: {key!r}")
    data = msg.value()
    record = {"partition": msg.partition(), "offset": msg.offset(), "key": key,
              "schema_id": None, "value": None}
    if data is None:
        return record
    if len(data) < 5 or data[0] != MAGIC_BYTE:
        first = f"0x{data[0]:02x}" if data else "nothing"
        fail(4, f"{where}: value is not in the Confluent wire format: it starts with {first} "
                f"and is {len(data)} bytes long (expected magic byte 0 and a 4-byte schema id)")
    record["schema_id"] = struct.unpack(">I", data[1:5])[0]
    try:
        value = deserializer(data, SerializationContext(msg.topic(), MessageField.VALUE))
    except SchemaRegistryError as e:
        registry_failure(f"{where}: schema id {record['schema_id']}", e)
    except REGISTRY_UNREACHABLE as e:
        registry_failure(f"{where}: schema id {record['schema_id']}", e)
    except Exception as e:  # SerializationError, fastavro errors on a bad datum
        fail(4, f"{where}: cannot decode value with schema id {record['schema_id']}: {e!r}")
    record["value"] = to_plain(value)
    return record


def consume(args):
    deadline = time.monotonic() + args.timeout
    deserializer = AvroDeserializer(registry_client(args))
    consumer = Consumer(kafka_config(args, **{
        "group.id": f"twinflow-confluent-io-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
    }))
    records = []
    last_error = None
    try:
        if args.expect > 0:
            # Every partition from the beginning by assignment: no group rebalance to
            # wait for, and nothing committed.
            consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING)
                             for p in wait_for_partitions(consumer, args.topic, deadline)])
        while len(records) < args.expect:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f"; last client error: {last_error}" if last_error else ""
                fail(2, f"timeout after {args.timeout:g} s: read {len(records)} of "
                        f"{args.expect} records of {args.topic}{detail}")
            msg = consumer.poll(min(0.5, remaining))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    last_error = msg.error()
                    print(f"confluent_io: client error: {last_error}", file=sys.stderr)
                continue
            records.append(decode(deserializer, msg))
    finally:
        consumer.close()

    records.sort(key=lambda r: (r["partition"], r["offset"]))
    json.dump({"records": records}, sys.stdout)
    sys.stdout.write("\n")


# --- command line ----------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--bootstrap", required=True, help="HOST:PORT of a broker")
        q.add_argument("--registry", required=True, metavar="URL",
                       help="schema registry base URL, e.g. http://127.0.0.1:8081")
        q.add_argument("--registry-user", metavar="NAME:PASSWORD",
                       help="HTTP basic auth credentials for the schema registry")
        q.add_argument("--topic", required=True)
        q.add_argument("-X", action="append", default=[], metavar="KEY=VALUE",
                       help="extra librdkafka setting (repeatable)")

    q = sub.add_parser("produce", help="serialize JSON lines with AvroSerializer and produce them")
    common(q)
    q.add_argument("--schema", required=True, metavar="FILE.avsc",
                   help="writer schema, registered under TOPIC-value if new")
    q.add_argument("--input", required=True, metavar="FILE.jsonl",
                   help="one JSON object (record value, with asset_id) per line")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up (exit 2) when not all is delivered by then (default 30)")

    q = sub.add_parser("consume", help="read records with AvroDeserializer")
    common(q)
    q.add_argument("--expect", type=int, required=True, metavar="N",
                   help="stop once N records were read")
    q.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up (exit 2) when N records were not read by then (default 30)")

    args = p.parse_args()
    if args.registry_user is not None and ":" not in args.registry_user:
        p.error("--registry-user must be NAME:PASSWORD")
    if args.command == "consume" and args.expect < 0:
        p.error("--expect must be >= 0")
    return args


def main():
    args = parse_args()
    if args.command == "produce":
        produce(args)
    else:
        consume(args)


if __name__ == "__main__":
    main()
