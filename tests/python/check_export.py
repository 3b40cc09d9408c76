"""Reads a `twinflow export` directory as an ML team would, with pyarrow, DuckDB and pandas,
and prints what it found as JSON for the Rust test to compare with the history topic:

- the twin rows (asset_id, version, status) and that pyarrow and DuckDB agree on them;
- each row's date partition against its updated_at;
- the alert rows;
- as-of joins of labels to features (pandas merge_asof and DuckDB ASOF JOIN), at every
  alert's raised_at and at times between versions, and whether any joined feature (the
  version, or any of its property values) has an event time after its label's time.

Usage: check_export.py <export dir>
"""

import json
import sys

import duckdb
import pandas as pd
import pyarrow.dataset as ds

out = sys.argv[1]
twins = ds.dataset(f"{out}/twins", format="parquet", partitioning="hive").to_table()
alerts = ds.dataset(f"{out}/alerts", format="parquet").to_table()
frame = twins.to_pandas()

con = duckdb.connect()
con.execute(
    f"CREATE VIEW twins AS SELECT * FROM read_parquet('{out}/twins/*/*.parquet', hive_partitioning = true)"
)
duck_rows = sorted(
    (a, v, s) for a, v, s in con.execute("SELECT asset_id, version, status FROM twins").fetchall()
)
rows = sorted(
    (a, int(v), s)
    for a, v, s in zip(frame["asset_id"], frame["version"], frame["status"])
)

dates_match = all(
    str(d) == u.strftime("%Y-%m-%d") for d, u in zip(frame["date"], frame["updated_at"])
)

# Labels: every alert's raise, and a time between each pair of versions of an asset.
features = frame[frame["status"] != "DELETED"].copy()
labels = [
    (a, t) for a, t in zip(alerts.column("asset_id").to_pylist(), alerts.column("raised_at").to_pylist())
]
for asset, group in features.sort_values("event_time").groupby("asset_id"):
    times = list(group["event_time"])
    for earlier, later in zip(times, times[1:]):
        labels.append((asset, earlier + (later - earlier) / 2))
label_frame = pd.DataFrame(labels, columns=["asset_id", "label_time"])
label_frame["label_time"] = pd.to_datetime(label_frame["label_time"], utc=True).astype(
    features["event_time"].dtype
)
label_frame = label_frame.sort_values("label_time")
features = features.sort_values("event_time")

time_columns = [c for c in features.columns if c.endswith("_time") and c != "event_time"]


def leaks(joined, label_column):
    """Rows whose version, or any of whose values, is from after the label."""
    bad = joined["event_time"] > joined[label_column]
    for c in time_columns:
        bad |= joined[c].notna() & (joined[c] > joined[label_column])
    return int(bad.sum())


joined = pd.merge_asof(
    label_frame,
    features,
    left_on="label_time",
    right_on="event_time",
    by="asset_id",
    direction="backward",
)
matched = joined[joined["version"].notna()]

later = int(
    sum(
        ((features["asset_id"] == a) & (features["event_time"] > t)).sum()
        for a, t in zip(label_frame["asset_id"], label_frame["label_time"])
    )
)

con.register("labels", label_frame)
duck_joined = con.execute(
    "SELECT l.label_time, t.* FROM labels l ASOF JOIN "
    "(SELECT * FROM twins WHERE status <> 'DELETED') t "
    "ON l.asset_id = t.asset_id AND l.label_time >= t.event_time"
).df()

print(
    json.dumps(
        {
            "rows": rows,
            "duckdb_agrees": rows == duck_rows,
            "dates_match": dates_match,
            "columns": twins.column_names,
            "alerts": sorted(
                zip(
                    alerts.column("alert_id").to_pylist(),
                    alerts.column("code").to_pylist(),
                    [c is not None for c in alerts.column("cleared_at").to_pylist()],
                    alerts.column("cleared_reason").to_pylist(),
                    [a is not None for a in alerts.column("acknowledged_at").to_pylist()],
                )
            ),
            "labels": len(label_frame),
            "pandas_matched": len(matched),
            "pandas_leaks": leaks(matched, "label_time"),
            "duckdb_matched": len(duck_joined),
            "duckdb_leaks": leaks(duck_joined, "label_time"),
            # Versions after some label's time: the joins had something they could leak.
            "later_versions": later,
        }
    )
)
