#!/usr/bin/env python3
"""Load twinflow's fleet page in headless Chromium and check that it shows live content.

Drives Debian's `chromium` through the DevTools protocol (websocket-client): opens the
page at 1280x900, waits, reads the figures the page shows, checks them, and saves a
screenshot. The page keeps a stream (EventSource) open, so a plain `--dump-dom` would
read it before anything arrived; the protocol lets the check read it after a real wait.

    check_page.py URL --screenshot OUT.png [--wait-ms 5000] [--chromium chromium]
        [--expect-map map|plot] [--select ASSET --desired PROPERTY=VALUE --write-token TOKEN]

Prints one JSON line: {"assets", "map_mode", "tiles_loaded", "alert_rows",
"events_received", "events_per_second", "fleet_twins", "connection"}, and with --select
also the selected twin's detail: "twin_rows" (properties shown), "alert_codes" (its alerts),
"charts" (property to points charted from its history), "polylines", and "desired_result"
(what the page says of its desired write). Checks: at least one asset drawn (`data-asset`
on the map or the plot), `#events-received` > 0 (live events arrived over the stream),
`#connection` says live; with --expect-map, that the map loaded tiles or fell back to the
plot; with --select, that the twin's properties show.

Exit codes: 0 all checks hold; 1 a check failed (the message says which); 2 Chromium
could not be started or driven.
"""

import argparse
import base64
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

FIGURES = """JSON.stringify({
  assets: document.querySelectorAll('#map [data-asset], #plot [data-asset]').length,
  map_mode: document.getElementById('map-mode').textContent,
  tiles_loaded: document.querySelectorAll('#map img.leaflet-tile-loaded').length,
  alert_rows: document.querySelectorAll('#alerts tr[data-alert]').length,
  events_received: Number(document.getElementById('events-received').textContent),
  events_per_second: Number(document.getElementById('events-per-second').textContent),
  fleet_twins: Number(document.getElementById('fleet-twins').textContent),
  connection: document.getElementById('connection').textContent,
})"""


def fail(code, message):
    print(f"check_page: {message}", file=sys.stderr)
    sys.exit(code)


class DevTools:
    """One page target, driven over the DevTools websocket."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    fail(2, f"{method}: {reply['error']}")
                return reply["result"]


def start_chromium(binary, profile):
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    stop(proc)
    fail(2, "chromium did not start its DevTools endpoint")


def stop(proc):
    """Ends Chromium and its helper processes (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def evaluate(tools, expression):
    result = tools.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
    if "exceptionDetails" in result:
        fail(1, f"the page failed: {result['exceptionDetails']}")
    return result["result"].get("value")


def use_twin_panel(tools, args):
    """Clicks the asset on the map, reads its panel, and sets a desired value through the
    form as a user would; returns what the panel then shows."""
    clicked = evaluate(tools, f"""(() => {{
      const c = document.querySelector('[data-asset={json.dumps(args.select)}]');
      if (!c) return false;
      c.dispatchEvent(new MouseEvent('click', {{bubbles: true}}));
      return true;
    }})()""")
    if not clicked:
        fail(1, f"{args.select} is not on the map")
    # The detail: its properties, its alerts, and a chart per numeric property from its
    # history (fetched once selected).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        detail = evaluate(tools, """({
          twin_rows: document.querySelectorAll('#twin-props tr[data-property]').length,
          alert_codes: [...document.querySelectorAll('#twin-alerts tr[data-alert-code]')].map((r) => r.dataset.alertCode),
          charts: Object.fromEntries([...document.querySelectorAll('#twin-charts .chart')]
            .map((c) => [c.dataset.property, Number(c.dataset.points)])),
          polylines: document.querySelectorAll('#twin-charts svg polyline').length,
        })""")
        if detail["charts"]:
            break
        time.sleep(0.2)
    out = detail
    # Why each rule is raised, pending or not (explain), forecasts with their prediction.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out["rules"] = evaluate(tools, """Object.fromEntries([...document.querySelectorAll('#twin-rules tr[data-rule]')]
          .map((r) => [r.dataset.rule, [r.dataset.state, r.dataset.prediction]]))""")
        if out["rules"]:
            break
        time.sleep(0.2)
    if args.whatif:
        prop, value = args.whatif.split("=", 1)
        evaluate(tools, f"""(() => {{
          document.getElementById('whatif-property').value = {json.dumps(prop)};
          document.getElementById('whatif-value').value = {json.dumps(value)};
          document.getElementById('whatif-minutes').value = '10';
          document.getElementById('whatif-run').click();
        }})()""")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            final = evaluate(tools, "document.querySelector('#whatif-result li[data-final]')?.dataset.final ?? null")
            if final is not None:
                break
            time.sleep(0.2)
        out["whatif_final"] = final
        out["whatif_events"] = evaluate(tools, """[...document.querySelectorAll('#whatif-result li[data-events]')]
          .flatMap((l) => l.dataset.events.split(',')).filter((e) => e)""")
    if args.desired:
        prop, value = args.desired.split("=", 1)
        evaluate(tools, f"""(() => {{
          document.getElementById('desired-property').value = {json.dumps(prop)};
          document.getElementById('desired-value').value = {json.dumps(value)};
          document.getElementById('write-token').value = {json.dumps(args.write_token)};
          document.getElementById('desired-set').click();
        }})()""")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = evaluate(tools, "document.getElementById('desired-result').textContent")
            if text and text != "sending…":
                break
            time.sleep(0.2)
        out["desired_result"] = text
        # The twin with its new desired value comes over the stream.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out["desired_rows"] = evaluate(tools, """[...document.querySelectorAll('#twin-props tr[data-property]')]
              .filter((r) => r.cells[2].textContent !== '').length""")
            if out["desired_rows"]:
                break
            time.sleep(0.2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--screenshot", required=True, metavar="OUT.png")
    p.add_argument("--wait-ms", type=int, default=5000, help="how long the page runs first")
    p.add_argument("--chromium", default="chromium")
    p.add_argument("--select", help="click this asset on the map")
    p.add_argument("--desired", help="PROPERTY=VALUE to set through the page's form")
    p.add_argument("--write-token", default="")
    p.add_argument("--whatif", help="PROPERTY=VALUE to hold for ten minutes in the what-if panel")
    p.add_argument("--expect-map", choices=["map", "plot"],
                   help="map: Leaflet with loaded tiles; plot: the fallback without tiles")
    args = p.parse_args()
    binary = shutil.which(args.chromium)
    if not binary:
        fail(2, f"{args.chromium} not found (bash .ci/setup installs Debian's chromium)")

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc, host = start_chromium(binary, profile)
        try:
            targets = json.load(urllib.request.urlopen(f"http://{host}/json/list", timeout=10))
            page = next(t for t in targets if t.get("type") == "page")
            tools = DevTools(page["webSocketDebuggerUrl"])
            tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                       deviceScaleFactor=1, mobile=False)
            tools.call("Page.navigate", url=args.url)
            time.sleep(args.wait_ms / 1000)
            result = tools.call("Runtime.evaluate", expression=FIGURES, returnByValue=True)
            if "exceptionDetails" in result:
                fail(1, f"the page lacks an element the check reads: {result['exceptionDetails']}")
            figures = json.loads(result["result"]["value"])
            if args.select:
                figures.update(use_twin_panel(tools, args))
            shot = tools.call("Page.captureScreenshot", format="png")
            with open(args.screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        finally:
            stop(proc)

    print(json.dumps(figures))
    if figures["assets"] < 1:
        fail(1, "no asset plotted in #map")
    if figures["events_received"] < 1:
        fail(1, "no live event received over the stream")
    if figures["connection"] != "live":
        fail(1, f"connection says {figures['connection']!r}, not live")
    if args.expect_map == "map" and (figures["map_mode"] != "map" or figures["tiles_loaded"] < 1):
        fail(1, f"no map with tiles: {figures['map_mode']!r}, {figures['tiles_loaded']} tiles")
    if args.expect_map == "plot" and not figures["map_mode"].startswith("plot"):
        fail(1, f"no fallback to the plot: {figures['map_mode']!r}")
    if args.select and figures["twin_rows"] < 1:
        fail(1, f"the panel shows no property of {args.select}")


if __name__ == "__main__":
    main()
