#!/usr/bin/env python3
"""An MQTT client over WebSocket, as a browser HMI connects (paho-mqtt's websockets transport,
subprotocol `mqtt`): connects, subscribes to --topic, publishes --payload to it at QoS 1 and
waits for it to come back through the broker.

Prints one JSON object: {"connected": bool, "published": bool, "received": [payload, ...]}.
A refused login prints connected = false (the broker closes the connection).

Usage: ws_client.py --url ws://127.0.0.1:PORT/mqtt --user U --password W --topic T --payload P
       [--cafile ca.pem] [--mqtt 3.1.1|5]
"""
import argparse, json, ssl, threading, urllib.parse

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--payload", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--mqtt", default="3.1.1", choices=["3.1.1", "5"])
    a = ap.parse_args()
    url = urllib.parse.urlparse(a.url)
    v5 = a.mqtt == "5"
    c = mqtt.Client(client_id=f"ws-{a.mqtt}-{url.scheme}", transport="websockets",
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    c.ws_set_options(path=url.path or "/mqtt")
    if url.scheme == "wss":
        c.tls_set(ca_certs=a.cafile, cert_reqs=ssl.CERT_REQUIRED)
    c.username_pw_set(a.user, a.password)
    out = {"connected": False, "published": False, "received": []}
    connected, done, received = threading.Event(), threading.Event(), threading.Event()

    def on_connect(_c, _u, _f, rc, _p=None):
        if rc == 0:
            out["connected"] = True
            connected.set()
        done.set()

    def on_disconnect(*_args):
        done.set()

    def on_message(_c, _u, msg):
        out["received"].append(msg.payload.decode())
        received.set()

    c.on_connect, c.on_disconnect, c.on_message = on_connect, on_disconnect, on_message
    try:
        c.connect(url.hostname, url.port, keepalive=30)
    except OSError as e:
        out["error"] = str(e)
        print(json.dumps(out))
        return
    c.loop_start()
    done.wait(10)
    if out["connected"]:
        c.subscribe(a.topic, qos=1)
        info = c.publish(a.topic, a.payload, qos=1)
        info.wait_for_publish(10)
        out["published"] = info.is_published()
        received.wait(10)
        c.disconnect()
    c.loop_stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
