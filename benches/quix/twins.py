"""twinflow's vehicle twin, written as a Quix Streams application.

The benchmark peer of twinflow (see README.md beside this file): it reads the same
telemetry topic, keeps one twin per asset in Quix's RocksDB state and writes the same
twin changelog and alert events, so both can drain the same input on the same broker.

Per reading (keyed by asset id, a plain Avro datum of schemas/vehicle_telemetry.avsc, or
with TWINS_FORMAT=json one JSON object with the same field names, as twinflow's "json"
telemetry format reads it):
a reading outside the model's valid ranges is dropped and counted; otherwise each
non-null property whose stored value is not newer in event time is taken, the version
grows by one, the status is ACTIVE while speed is above the model's threshold (IDLE
otherwise; twinflow's idle and offline timers are left out), and the model's rules raise
and clear edge-triggered alerts. The twin goes to the changelog (schemas/vehicle_twin.avsc),
each transition to the alert topic (schemas/alert_event.avsc); with TWINS_FORMAT=json both
are written as JSON, Quix Streams' own serializer, as its examples do. Model, rules and topic
names come from topology/vehicle.toml and topology/topics.toml.

Environment:
    TWINS_BOOTSTRAP        broker address (default 127.0.0.1:9092)
    TWINS_GROUP            consumer group (default twins-quix)
    TWINS_STATE_DIR        Quix state directory (default: a new temporary directory)
    TWINS_GUARANTEE        at-least-once (default) or exactly-once
    TWINS_COMMIT_INTERVAL  seconds between commits, float (default 0.1, as twinflow)
    TWINS_TOPOLOGY         the model file (default topology/vehicle.toml)
    TWINS_FORMAT           avro (default) or json: the input's format, and the outputs'

Runs until SIGTERM or SIGINT.
"""

import json
import logging
import os
import struct
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import xxhash

with warnings.catch_warnings(record=True):  # Authlib's deprecation notice, on import
    from quixstreams import Application
    from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = Path(os.environ.get("TWINS_TOPOLOGY", ROOT / "topology/vehicle.toml"))
MODEL = tomllib.loads(MODEL_FILE.read_text())
TOPICS = tomllib.loads((MODEL_FILE.parent / "topics.toml").read_text())
FETCH_LIMIT = {"receive.message.max.bytes": 2147483647}


def schema(path: Path) -> dict:
    """An Avro schema, its timestamps read and written as plain epoch-ms longs."""

    def plain(node):
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items() if k != "logicalType"}
        return [plain(v) for v in node] if isinstance(node, list) else node

    return plain(json.loads(path.read_text()))


TELEMETRY = schema(MODEL_FILE.parent / MODEL["telemetry_schema"])
TWIN = schema(MODEL_FILE.parent / MODEL["twin_schema"])
ALERT = schema(ROOT / "schemas/alert_event.avsc")
PROPERTIES = [f["name"] for f in TELEMETRY["fields"][2:]]
RANGES = [(p, r["min"], r["max"]) for p, r in MODEL.get("properties", {}).items()]
ACTIVE_PROPERTY = MODEL["status"]["active_property"]
ACTIVE_ABOVE = MODEL["status"]["active_above"]
OPS = {
    ">": float.__gt__,
    ">=": float.__ge__,
    "<": float.__lt__,
    "<=": float.__le__,
}
# Threshold rules only: the benchmark runs twinflow on the model without its forecast rules.
RULES = [r for r in MODEL.get("rules", []) if r.get("kind", "threshold") == "threshold"]
RULE_ORDER = {rule["code"]: i for i, rule in enumerate(RULES)}
invalid = 0


def valid(reading: dict) -> bool:
    global invalid
    for prop, low, high in RANGES:
        value = reading.get(prop)
        if value is not None and not low <= value <= high:
            invalid += 1
            return False
    return True


def alert_id(asset_id: str, code: str, raised_at: int) -> str:
    """twinflow's deterministic id: xxh3-128 of asset, code and raising event time."""
    data = b"%s\0%s\0%s" % (asset_id.encode(), code.encode(), struct.pack(">q", raised_at))
    return xxhash.xxh3_128_hexdigest(data)


def new_twin(asset_id: str) -> dict:
    twin = {"asset_id": asset_id, "version": 0, "event_time": 0, "last_seen": 0}
    twin.update(updated_at=0, still_since=None, status="ACTIVE", property_times={})
    twin.update({prop: None for prop in PROPERTIES}, active_alerts=[], pending_alerts=[])
    return twin


def evaluate(twin: dict, applied: list, at: int) -> list:
    """Edge-triggered rules on the properties the reading set; returns the transitions."""
    events = []
    for rule in RULES:
        prop = rule["property"]
        if prop not in applied:
            continue
        value, holds = float(twin[prop]), OPS[rule["op"]]
        raised = next((a for a in twin["active_alerts"] if a["code"] == rule["code"]), None)
        if raised is not None:
            if holds(value, float(rule.get("clear_threshold", rule["threshold"]))):
                continue
            twin["active_alerts"].remove(raised)
            state, raised_at, id_ = "CLEARED", raised["raised_at"], raised["alert_id"]
        elif holds(value, float(rule["threshold"])):
            state, raised_at = "RAISED", at
            id_ = alert_id(twin["asset_id"], rule["code"], at)
            twin["active_alerts"].append(
                {"alert_id": id_, "code": rule["code"], "severity": rule["severity"],
                 "value": value, "threshold": rule["threshold"], "raised_at": at,
                 "acknowledged_at": None, "acknowledged_by": None})
            twin["active_alerts"].sort(key=lambda a: RULE_ORDER[a["code"]])
        else:
            continue
        events.append(
            {"alert_id": id_, "asset_id": twin["asset_id"], "code": rule["code"],
             "severity": rule["severity"], "state": state, "property": prop,
             "operator": rule["op"], "value": value, "threshold": rule["threshold"],
             "event_time": at, "raised_at": raised_at, "twin_version": twin["version"],
             "acknowledged_by": None})
    return events


def merge_and_evaluate(reading: dict, state):
    """Merges a reading into the asset's twin; returns (twin, alert events) or None."""
    twin = state.get("twin") or new_twin(reading["asset_id"])
    at, times = reading["event_time"], twin["property_times"]
    applied = [p for p in PROPERTIES
               if reading.get(p) is not None and at >= times.get(p, at)]
    if twin["version"] and not applied and at <= twin["event_time"]:
        return None  # a duplicate or a stale reading: nothing changes
    for prop in applied:
        twin[prop], times[prop] = reading[prop], at
    now = int(time.time() * 1000)
    twin.update(version=twin["version"] + 1, event_time=max(twin["event_time"], at),
                last_seen=now, updated_at=now)
    twin["status"] = "ACTIVE" if (twin[ACTIVE_PROPERTY] or 0.0) > ACTIVE_ABOVE else "IDLE"
    alerts = evaluate(twin, applied, at)
    state.set("twin", twin)
    return twin, alerts


def main():
    app = Application(
        broker_address=os.environ.get("TWINS_BOOTSTRAP", "127.0.0.1:9092"),
        consumer_group=os.environ.get("TWINS_GROUP", "twins-quix"),
        state_dir=os.environ.get("TWINS_STATE_DIR") or tempfile.mkdtemp(prefix="twins-quix-"),
        processing_guarantee=os.environ.get("TWINS_GUARANTEE", "at-least-once"),
        commit_interval=float(os.environ.get("TWINS_COMMIT_INTERVAL", "0.1")),
        auto_offset_reset="earliest",
        consumer_extra_config=FETCH_LIMIT,
        producer_extra_config=FETCH_LIMIT,
        loglevel=logging.WARNING,
    )
    if os.environ.get("TWINS_FORMAT", "avro") == "json":
        reading, twin, alert = "json", "json", "json"
    else:
        reading = AvroDeserializer(schema=TELEMETRY)
        twin, alert = AvroSerializer(TWIN), AvroSerializer(ALERT)
    telemetry = app.topic(TOPICS["telemetry"]["name"], value_deserializer=reading)
    changelog = app.topic(TOPICS["changelog"]["name"], value_serializer=twin)
    alerts = app.topic(TOPICS["alerts"]["name"], value_serializer=alert)

    sdf = app.dataframe(telemetry)
    sdf = sdf.filter(valid)
    sdf = sdf.apply(merge_and_evaluate, stateful=True).filter(lambda r: r is not None)
    sdf.apply(lambda r: r[0]).to_topic(changelog)
    sdf.apply(lambda r: r[1], expand=True).to_topic(alerts)

    app.run()
    print(f"dropped {invalid} invalid readings")


if __name__ == "__main__":
    main()
