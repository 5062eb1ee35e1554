#!/usr/bin/env python3
"""Two hours of a press as a Sparkplug B node reports them (payloads by pysparkplug, MQTT by
paho-mqtt), with the truth an OEE report must match.

The press (group plant1, node gw2, device press2) runs, breaks down at minute 30, runs again
from minute 45. Each running minute it makes 2 good parts; on running minutes divisible by 10
also 1 scrap. Status (Int32: 1 running, 3 down) and the counters Counters/Good and
Counters/Scrap (UInt64, cumulative) go out as DDATA by alias, at QoS 1.

Prints the truth: run and down minutes, good and scrap parts, and availability, performance
and quality for --ideal-cycle-ms over the two hours from --start-ms.
"""
import argparse, json, sys

import paho.mqtt.client as mqtt
from pysparkplug import DataType, DBirth, DData, Metric, NBirth, NDeath

GROUP, NODE, DEVICE = "plant1", "gw2", "press2"
MINUTES, DOWN = 120, range(30, 45)


def topic(kind, device=None):
    return f"spBv1.0/{GROUP}/{kind}/{NODE}" + (f"/{device}" if device else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--start-ms", type=int, required=True)
    ap.add_argument("--ideal-cycle-ms", type=int, required=True)
    a = ap.parse_args()
    c = mqtt.Client(client_id="sparkplug-gw2", clean_session=True)
    c.username_pw_set(a.user, a.password)
    c.connect("127.0.0.1", a.port, keepalive=30)
    c.loop_start()
    seq = 0

    def send(t, payload, dtypes=False):
        info = c.publish(t, payload.encode(include_dtypes=dtypes), qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            sys.exit(f"{t} not acknowledged")

    def next_seq():
        nonlocal seq
        seq = (seq + 1) % 256
        return seq

    ms = lambda minute, second=0: a.start_ms + minute * 60_000 + second * 1000
    t0 = ms(0)
    send(topic("NBIRTH"), NBirth(timestamp=t0, seq=0, metrics=(
        Metric(timestamp=t0, name="bdSeq", datatype=DataType.INT64, value=0),)), dtypes=True)
    send(topic("DBIRTH", DEVICE), DBirth(timestamp=t0, seq=next_seq(), metrics=(
        Metric(timestamp=t0, name="Status", alias=1, datatype=DataType.INT32, value=1),
        Metric(timestamp=t0, name="Counters/Good", alias=2, datatype=DataType.UINT64, value=0),
        Metric(timestamp=t0, name="Counters/Scrap", alias=3, datatype=DataType.UINT64, value=0),
    )), dtypes=True)
    good = scrap = 0
    run = down = 0
    for m in range(MINUTES):
        if m == DOWN.start or m == DOWN.stop:
            status = 3 if m == DOWN.start else 1
            send(topic("DDATA", DEVICE), DData(timestamp=ms(m), seq=next_seq(), metrics=(
                Metric(timestamp=ms(m), name=None, alias=1, datatype=DataType.INT32, value=status),)))
        if m in DOWN:
            down += 1
            continue
        run += 1
        good += 2
        scrap += 1 if m % 10 == 0 else 0
        # The counters after this minute's work, sent in its middle.
        send(topic("DDATA", DEVICE), DData(timestamp=ms(m, 30), seq=next_seq(), metrics=(
            Metric(timestamp=ms(m, 30), name=None, alias=2, datatype=DataType.UINT64, value=good),
            Metric(timestamp=ms(m, 30), name=None, alias=3, datatype=DataType.UINT64, value=scrap),
        )))
    send(topic("NDEATH"), NDeath(timestamp=ms(MINUTES), bd_seq_metric=Metric(
        timestamp=ms(MINUTES), name="bdSeq", datatype=DataType.INT64, value=0)))
    c.disconnect()
    c.loop_stop()
    parts = good + scrap
    print(json.dumps({
        "machine": "plant-1/line-b/press-2", "from_ms": ms(0), "to_ms": ms(MINUTES),
        "run_minutes": run, "down_minutes": down, "good": good, "scrap": scrap,
        "availability": run / MINUTES,
        "performance": parts * a.ideal_cycle_ms / (run * 60_000),
        "quality": good / parts,
    }))


if __name__ == "__main__":
    main()
