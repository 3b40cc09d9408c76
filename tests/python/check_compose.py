"""Checks docker/compose.yaml without a Docker engine: the structure `docker compose config`
would refuse, and the references between the files of docker/.

Usage: check_compose.py <docker dir>. Prints what is wrong and exits 1, or prints "ok".
"""

import json
import pathlib
import re
import sys

import yaml

docker = pathlib.Path(sys.argv[1])
compose = yaml.safe_load((docker / "compose.yaml").read_text())
problems = []

services = compose.get("services")
if not isinstance(services, dict) or not services:
    sys.exit("compose.yaml: no services")
volumes = set((compose.get("volumes") or {}).keys())

for name, service in services.items():
    if "image" not in service and "build" not in service:
        problems.append(f"{name}: neither image nor build")
    build = service.get("build")
    if build:
        context = docker / build["context"]
        if not (context / build.get("dockerfile", "Dockerfile")).is_file():
            problems.append(f"{name}: no Dockerfile at {build}")
    depends = service.get("depends_on") or {}
    for dep in depends if isinstance(depends, list) else depends.keys():
        if dep not in services:
            problems.append(f"{name}: depends on unknown service {dep}")
    for mount in service.get("volumes") or []:
        source = mount.split(":")[0]
        if source.startswith("."):
            if not (docker / source).exists():
                problems.append(f"{name}: mounts missing {source}")
        elif source not in volumes:
            problems.append(f"{name}: named volume {source} is not declared")
    for port in service.get("ports") or []:
        host, _, container = str(port).partition(":")
        if not (host.isdigit() and container.isdigit()):
            problems.append(f"{name}: port mapping {port!r} is not host:container")

# Prometheus scrapes the twinflow service on the port its config listens on.
prometheus = yaml.safe_load((docker / "prometheus.yml").read_text())
targets = [t for job in prometheus["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
config = (docker / "twinflow.toml").read_text()
listen = [l for l in config.splitlines() if l.strip().startswith("listen")]
port = listen[0].split(":")[-1].strip().strip('"') if listen else None
if f"twinflow:{port}" not in targets:
    problems.append(f"prometheus.yml scrapes {targets}, twinflow listens on port {port}")

# The MQTT bridge: the broker its [ingest.mqtt] names is a service, the bridge runs
# `twinflow bridge`, and the simulator publishes to that broker.
broker = re.search(r'^url = "mqtts?://([^:/"]+)', config, re.M)
if not broker or broker.group(1) not in services:
    problems.append(f"[ingest.mqtt] url names no compose service: {broker and broker.group(1)}")
elif "bridge" not in (services.get("bridge") or {}).get("command", []):
    problems.append("the bridge service does not run `twinflow bridge`")
elif f"mqtt://{broker.group(1)}:1883" not in (services.get("simulator") or {}).get("command", []):
    problems.append("the simulator does not publish to the bridge's broker")

# Grafana: the provisioned dashboards directory is the one mounted, and holds valid JSON.
provider = yaml.safe_load((docker / "grafana/provisioning/dashboards/twinflow.yaml").read_text())
path = provider["providers"][0]["options"]["path"]
mounted = [m for m in services["grafana"]["volumes"] if m.split(":")[1] == path]
if not mounted:
    problems.append(f"grafana: dashboards provisioned from {path}, which is not mounted")
for dashboard in (docker / "grafana/dashboards").glob("*.json"):
    json.loads(dashboard.read_text())

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("ok")
