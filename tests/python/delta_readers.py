"""Reads the cloud's Delta tables with two readers no one here wrote: delta-rs (the `deltalake`
package and its own SQL engine) and DuckDB with its `delta` extension.

Usage: delta_readers.py DATA_DIR | s3://BUCKET/PREFIX
Prints one JSON object: per reader, the rows of each table, parts per machine and outcome, and
temperature readings per machine. On S3 (credentials and AWS_ENDPOINT_URL from the environment)
only delta-rs reads: DuckDB's S3 access needs its httpfs extension, which is not installed here.
"""

import json
import os
import sys

import deltalake
import duckdb
import pyarrow as pa
from duckdb_extensions import import_extension

TABLES = ("telemetry", "events", "part_counts", "alerts")

PARTS = """
    select site || '/' || line || '/' || machine as m, outcome as o, count(*) as n
    from events where kind = 'part' group by 1, 2
"""
TEMPERATURE = """
    select site || '/' || line || '/' || machine as m, count(*) as n
    from telemetry where metric = 'temperature' group by 1
"""


def shape(rows, parts, temperature):
    out = {"rows": rows, "parts": {}, "temperature": {}}
    for m, o, n in parts:
        out["parts"].setdefault(m, {})[o] = n
    for m, n in temperature:
        out["temperature"][m] = n
    return out


def is_s3(data):
    return data.startswith("s3://")


def uri(data, table):
    return f"{data.rstrip('/')}/{table}" if is_s3(data) else os.path.join(data, table)


def storage_options(data):
    if not is_s3(data):
        return None
    opts = {"AWS_ALLOW_HTTP": "true"}
    if os.environ.get("AWS_ENDPOINT_URL"):
        opts["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
    return opts


def exists(data, table):
    if not is_s3(data):
        return os.path.isdir(os.path.join(data, table, "_delta_log"))
    try:
        deltalake.DeltaTable(uri(data, table), storage_options=storage_options(data))
        return True
    except deltalake.exceptions.TableNotFoundError:
        return False


def with_deltalake(data, tables):
    q = deltalake.QueryBuilder()
    for t in tables:
        q.register(t, deltalake.DeltaTable(uri(data, t), storage_options=storage_options(data)))

    def run(sql):
        t = pa.table(q.execute(sql).read_all())
        return list(zip(*(t.column(i).to_pylist() for i in range(t.num_columns))))

    rows = {t: run(f"select count(*) from {t}")[0][0] for t in tables}
    return shape(rows, run(PARTS), run(TEMPERATURE))


def with_duckdb(data, tables):
    # The extension comes as a PyPI wheel (extensions.duckdb.org may be out of reach).
    import_extension("delta")
    con = duckdb.connect()
    con.execute("LOAD delta")
    for t in tables:
        path = os.path.join(data, t).replace("'", "''")
        con.execute(f"create view {t} as select * from delta_scan('{path}')")
    rows = {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    return shape(rows, con.execute(PARTS).fetchall(), con.execute(TEMPERATURE).fetchall())


def batches_of(data, edge):
    """Diagnostics: the `sync_batches` rows of `edge` and the first outbox sequence numbers the
    data tables hold, as delta-rs reads them."""
    q = deltalake.QueryBuilder()
    for t in ("sync_batches", "events", "telemetry"):
        q.register(t, deltalake.DeltaTable(uri(data, t), storage_options=storage_options(data)))
    e = edge.replace("'", "''")

    def run(sql):
        t = pa.table(q.execute(sql).read_all())
        return list(zip(*(t.column(i).to_pylist() for i in range(t.num_columns))))

    rows = run(f"select received_at, items, duplicates, seqs from sync_batches "
               f"where edge = '{e}' order by received_at")
    first = {}
    for t in ("events", "telemetry"):
        sql = f"select distinct outbox_seq from {t} where edge = '{e}' and outbox_seq <= 10 order by 1"
        first[t] = [r[0] for r in run(sql)]
    return {"rows": [list(map(str, r)) for r in rows], "first_seqs": first}


def main():
    data = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "--batches-of":
        print(json.dumps(batches_of(data, sys.argv[3]), indent=1))
        return
    tables = [t for t in TABLES if exists(data, t)]
    readers = {"deltalake": with_deltalake(data, tables)}
    if not is_s3(data):
        readers["duckdb"] = with_duckdb(data, tables)
    print(json.dumps(readers))


if __name__ == "__main__":
    main()
