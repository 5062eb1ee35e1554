#!/usr/bin/env python3
"""A scripted Sparkplug B edge node for the end-to-end tests: payloads encoded by pysparkplug
(PyPI), MQTT by paho-mqtt, so that the edge's host is checked against code no one here wrote.

What it sends, in order (every PUBLISH at QoS 1, so each is stored by the edge when its
PUBACK returns), with timestamps from --start, one minute apart:

  NBIRTH  seq 0, bdSeq 0, node metric Temperature (alias 1)
  DBIRTH  press1 seq 1: Status=1 (alias 10), Counters/Good=100 (11), Counters/Scrap=5 (12),
          Spindle/Speed=1200.0 (13), Mode="auto" (14, text: not telemetry)
  DDATA   seq 2: aliases only: Good=110, Scrap=6, Speed=1250.0
  DDATA   seq 3: Status=3 (down)
  DDATA   seq 4: Status=1 (running), Good=115
  NDATA   seq 5: Temperature=21.5, historical, an hour before --start
  DDATA   seq 7 (seq 6 never sent: a gap): Good=120          -> the host asks for a rebirth
  DDATA   seq 8: alias 99, which no birth declared            -> dead letter
  DDATA   press2 (never born)                                 -> dead letter
  DDATA   press1, bytes that are not protobuf                 -> dead letter
  NDEATH  bdSeq 7 (stale: the current birth's is 0)           -> dead letter, node stays online
  ...waits for the NCMD Node Control/Rebirth...
  NBIRTH  seq 0, bdSeq 0 again (a rebirth keeps the session's bdSeq)
  DBIRTH  press1 seq 1: Good=120 (a new baseline: no parts)
  DDATA   seq 2: Good=3 (lower: the counter was reset; 3 parts)
  ...waits for a DCMD to press1 (a Millrace function writes Spindle/Speed)...
  NDEATH  bdSeq 0                                             -> node and device offline

Totals the edge must show for plant-1/line-a/press-1: good parts 10+5+5+3 = 23, scrap 1, state
changes running, down, running. Prints one JSON object: the host STATE it saw and the rebirth
commands and the device command (DCMD) it received.

Usage: sparkplug_node.py --port P --user U --password W --start-ms MS [--transport tcp|websockets]
"""
import argparse, json, sys, threading, time

import paho.mqtt.client as mqtt
from pysparkplug import DataType, DBirth, DCmd, DData, Metric, NBirth, NCmd, NData, NDeath

GROUP, NODE, DEVICE = "plant1", "gw1", "press1"


def topic(kind, device=None):
    return f"spBv1.0/{GROUP}/{kind}/{NODE}" + (f"/{device}" if device else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--start-ms", type=int, required=True)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "websockets"])
    a = ap.parse_args()

    seen = {"state": None, "rebirths": [], "writes": []}
    got_state, got_rebirth, got_write = threading.Event(), threading.Event(), threading.Event()

    def on_message(_c, _u, msg):
        if msg.topic.startswith("spBv1.0/STATE/"):
            seen["state"] = json.loads(msg.payload)
            got_state.set()
        elif msg.topic == topic("NCMD"):
            cmd = NCmd.decode(msg.payload)
            seen["rebirths"].append({m.name: m.value for m in cmd.metrics})
            got_rebirth.set()
        elif msg.topic == topic("DCMD", DEVICE):
            cmd = DCmd.decode(msg.payload)
            seen["writes"].append({m.name: [m.datatype.name, m.value] for m in cmd.metrics})
            got_write.set()

    c = mqtt.Client(client_id="sparkplug-gw1", clean_session=True, transport=a.transport)
    c.username_pw_set(a.user, a.password)
    death0 = NDeath(timestamp=a.start_ms, bd_seq_metric=Metric(timestamp=a.start_ms, name="bdSeq", datatype=DataType.INT64, value=0))
    c.will_set(topic("NDEATH"), death0.encode(), qos=1)
    c.on_message = on_message
    c.connect(a.host, a.port, keepalive=30)
    c.loop_start()
    for t in (topic("NCMD"), topic("DCMD", DEVICE), "spBv1.0/STATE/+"):
        r, mid = c.subscribe(t, qos=1)
        assert r == mqtt.MQTT_ERR_SUCCESS, r
    if not got_state.wait(10):
        sys.exit("no retained host STATE within 10 s")

    def send(t, payload, dtypes=False):
        raw = payload if isinstance(payload, bytes) else payload.encode(include_dtypes=dtypes)
        info = c.publish(t, raw, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"{t} not acknowledged"

    ts = lambda minute: a.start_ms + minute * 60_000
    M = lambda minute, alias, dt, v, name=None, **kw: Metric(timestamp=ts(minute), name=name, alias=alias, datatype=dt, value=v, **kw)

    def births(minute, good):
        send(topic("NBIRTH"), NBirth(timestamp=ts(minute), seq=0, metrics=(
            Metric(timestamp=ts(minute), name="bdSeq", datatype=DataType.INT64, value=0),
            M(minute, 1, DataType.FLOAT, 20.0, "Temperature"),
        )), dtypes=True)
        send(topic("DBIRTH", DEVICE), DBirth(timestamp=ts(minute), seq=1, metrics=(
            M(minute, 10, DataType.INT32, 1, "Status"),
            M(minute, 11, DataType.UINT64, good, "Counters/Good"),
            M(minute, 12, DataType.UINT64, 5, "Counters/Scrap"),
            M(minute, 13, DataType.DOUBLE, 1200.0, "Spindle/Speed"),
            M(minute, 14, DataType.STRING, "auto", "Mode"),
        )), dtypes=True)

    births(0, 100)
    send(topic("DDATA", DEVICE), DData(timestamp=ts(1), seq=2, metrics=(
        M(1, 11, DataType.UINT64, 110), M(1, 12, DataType.UINT64, 6), M(1, 13, DataType.DOUBLE, 1250.0))))
    send(topic("DDATA", DEVICE), DData(timestamp=ts(2), seq=3, metrics=(M(2, 10, DataType.INT32, 3),)))
    send(topic("DDATA", DEVICE), DData(timestamp=ts(3), seq=4, metrics=(
        M(3, 10, DataType.INT32, 1), M(3, 11, DataType.UINT64, 115))))
    send(topic("NDATA"), NData(timestamp=ts(4), seq=5, metrics=(
        M(-60, 1, DataType.FLOAT, 21.5, is_historical=True),)))
    send(topic("DDATA", DEVICE), DData(timestamp=ts(5), seq=7, metrics=(M(5, 11, DataType.UINT64, 120),)))
    send(topic("DDATA", DEVICE), DData(timestamp=ts(6), seq=8, metrics=(M(6, 99, DataType.DOUBLE, 1.0),)))
    send(topic("DDATA", "press2"), DData(timestamp=ts(6), seq=9, metrics=(M(6, 13, DataType.DOUBLE, 1.0),)))
    send(topic("DDATA", DEVICE), b"\xff\xff not protobuf")
    send(topic("NDEATH"), NDeath(timestamp=ts(7), bd_seq_metric=Metric(timestamp=ts(7), name="bdSeq", datatype=DataType.INT64, value=7)))
    if not got_rebirth.wait(20):
        sys.exit("no rebirth request within 20 s")
    births(8, 120)
    send(topic("DDATA", DEVICE), DData(timestamp=ts(9), seq=2, metrics=(M(9, 11, DataType.UINT64, 3),)))
    if not got_write.wait(60):
        sys.exit("no DCMD within 60 s")
    send(topic("NDEATH"), NDeath(timestamp=ts(10), bd_seq_metric=Metric(timestamp=ts(10), name="bdSeq", datatype=DataType.INT64, value=0)))
    c.disconnect()
    c.loop_stop()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
