#!/usr/bin/env python3
"""A Confluent Schema Registry stand-in for twinflow's tests.

An in-memory HTTP server (standard library only, plus fastavro to validate Avro
schemas) that speaks the documented subset of the Confluent Schema Registry
REST API that serializers, deserializers and twinflow itself use, so that
confluent-kafka's `SchemaRegistryClient`, `AvroSerializer` and
`AvroDeserializer` work against it unchanged.

Implemented:

    POST /subjects/{subject}/versions        register -> {"id": n}
    POST /subjects/{subject}                 look up  -> {"subject", "id", "version", "schema"}
    GET  /subjects                           ["a-value", ...]  (?subjectPrefix=, offset, limit)
    GET  /subjects/{subject}/versions        [1, 2, ...]
    GET  /subjects/{subject}/versions/{v}    {"subject", "version", "id", "schema"};
                                             v is a number, "latest" or -1
    GET  /subjects/{subject}/versions/{v}/schema   the schema text itself
    GET  /schemas/ids/{id}                   {"schema": "..."}  (?subject= accepted;
                                             ?fetchMaxId=true adds "maxId")
    GET  /schemas/ids/{id}/schema            the schema text itself
    GET  /schemas/ids/{id}/versions          [{"subject", "version"}, ...]
    GET  /schemas/ids/{id}/subjects          ["a-value", ...]
    GET  /schemas/types                      ["AVRO", "JSON"]
    GET  /associations/resources/{namespace}/{name}   [] (no associations)
    GET  /config, GET /config/{subject}      {"compatibilityLevel": "BACKWARD"}
    PUT  /config, PUT /config/{subject}      {"compatibility": "..."}, echoed back
    GET  /                                   {}

Schema ids are global: a schema gets the same id in every subject it is
registered under. Two schemas are the same when their JSON is equal once
parsed (object keys sorted, whitespace dropped) and their references are equal.
Avro's Parsing Canonical Form is deliberately not used: it drops docs, defaults
and logical types, and the real registry gives schemas that differ only in those
different ids. Registering a schema a subject already has returns its id and
adds no version. Stored schemas are answered in compact JSON, as the real
registry does. AVRO schemas (the default schemaType) are checked with
fastavro, including named types from "references"; JSON schemas only have to
be JSON; PROTOBUF is refused.

Errors are answered as the real registry writes them, e.g. HTTP 404 with
{"error_code": 40401, "message": "Subject 'x' not found."}: 40401 subject not
found, 40402 version not found, 40403 schema not found (404); 42201 invalid
schema, 42202 invalid version, 42203 invalid compatibility level (422); 401
unauthorized (with --user); 415 unsupported content type. A path or method
outside the subset answers 404 with error_code 404 and names the request.

Other query parameters clients send (normalize, deleted, format,
defaultToGlobal, ...) are accepted; those with nothing to act on here are
ignored: schemas are always compared in the normalized form above, and nothing
is ever deleted. confluent-kafka's serializers and deserializers look up
/associations/resources/-/{topic} before anything else (their default subject
name strategy); the empty answer makes them use {topic}-value.

Not implemented: compatibility checks (every schema is accepted whatever the
compatibility level says), deletes, modes, contexts, metadata and rule sets
(accepted in a request body, neither stored nor compared), persistence (all
state is lost when the process ends), TLS.

Usage:

    registry.py [--port 0] [--user name:password]

Binds 127.0.0.1 (port 0: a free port), prints exactly one line,
`listening http://127.0.0.1:PORT`, on stdout, and logs one line per request on
stderr (`METHOD path -> status`). With --user every request needs HTTP basic
auth with these credentials. Runs until SIGTERM or SIGINT, or until its stdin
reaches end of file when stdin is a pipe, socket or terminal, so a test that
starts it with a stdin pipe leaves nothing running when it dies. (A stdin that
is /dev/null or a regular file is not watched.)
"""

import argparse
import base64
import binascii
import hmac
import json
import os
import signal
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import fastavro

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
ACCEPTED_CONTENT_TYPES = {
    "application/vnd.schemaregistry.v1+json",
    "application/vnd.schemaregistry+json",
    "application/json",
    "application/octet-stream",
}
COMPATIBILITY_LEVELS = {
    "NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
    "FULL", "FULL_TRANSITIVE",
}
SCHEMA_TYPES = ("AVRO", "JSON")
MAX_VERSION = 2**31 - 1


class ApiError(Exception):
    """An error answer: HTTP status, Confluent error code, message."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def subject_not_found(subject):
    return ApiError(404, 40401, f"Subject '{subject}' not found.")


def version_not_found(version):
    return ApiError(404, 40402, f"Version {version} not found.")


def schema_not_found(schema_id=None):
    if schema_id is None:
        return ApiError(404, 40403, "Schema not found")
    return ApiError(404, 40403, f"Schema {schema_id} not found")


def invalid_schema(detail):
    return ApiError(422, 42201, f"Invalid schema: {detail}")


def invalid_version(text):
    return ApiError(
        422, 42202,
        f"The specified version '{text}' is not a valid version id. Allowed values are "
        f"between [1, 2^31-1] and the string \"latest\"",
    )


class Store:
    """All registered schemas and subjects, in memory."""

    def __init__(self):
        self.lock = threading.Lock()
        self.schemas = {}    # id -> {"schema", "schemaType", "references", "key"}
        self.by_key = {}     # identity key -> id
        self.subjects = {}   # subject -> [id of version 1, id of version 2, ...]
        self.compatibility = "BACKWARD"
        self.subject_compatibility = {}

    # -- internals (call with the lock held) -----------------------------------

    def _versions(self, subject):
        versions = self.subjects.get(subject)
        if not versions:
            raise subject_not_found(subject)
        return versions

    def _version_index(self, subject, text):
        """0-based index of version `text` ("latest", -1 or 1..) of `subject`."""
        versions = self._versions(subject)
        if text == "latest":
            return len(versions) - 1
        try:
            number = int(text)
        except (TypeError, ValueError):
            raise invalid_version(text) from None
        if number == -1:
            return len(versions) - 1
        if not 1 <= number <= MAX_VERSION:
            raise invalid_version(text)
        if number > len(versions):
            raise version_not_found(number)
        return number - 1

    def _reference_target(self, ref):
        """(version number, stored schema) that reference `ref` points at."""
        try:
            index = self._version_index(ref["subject"], ref["version"])
        except ApiError:
            raise invalid_schema(
                f"reference {ref['name']!r}: version {ref['version']} of subject "
                f"'{ref['subject']}' not found") from None
        target = self.schemas[self.subjects[ref["subject"]][index]]
        if target["schemaType"] != "AVRO":
            raise invalid_schema(f"reference {ref['name']!r} is not an AVRO schema")
        return index + 1, target

    def _parse_references(self, references, named, depth=0):
        """Parses the schemas `references` point at into `named` (fastavro named types)."""
        if depth > 32:
            raise invalid_schema("references nested too deeply")
        for ref in references:
            target = self._reference_target(ref)[1]
            self._parse_references(target["references"], named, depth + 1)
            fastavro.parse_schema(json.loads(target["schema"]), named_schemas=named)

    def _prepare(self, body):
        """Validates a register/lookup request body. Returns (key, stored text, type, refs)."""
        if not isinstance(body, dict):
            raise ApiError(422, 422, "The request body must be a JSON object")
        text = body.get("schema")
        if not isinstance(text, str) or not text.strip():
            raise invalid_schema('the request has no "schema" string')
        schema_type = body.get("schemaType") or "AVRO"
        if not isinstance(schema_type, str) or schema_type.upper() not in SCHEMA_TYPES:
            raise invalid_schema(
                f"schemaType {schema_type!r} is not supported here (only AVRO and JSON)")
        schema_type = schema_type.upper()
        references = body.get("references") or []
        if not isinstance(references, list):
            raise invalid_schema('"references" must be a list')
        refs = []
        for ref in references:
            if (not isinstance(ref, dict) or not isinstance(ref.get("name"), str)
                    or not isinstance(ref.get("subject"), str)
                    or not isinstance(ref.get("version"), (int, str))):
                raise invalid_schema(f"bad reference {ref!r}: needs name, subject and version")
            ref = {"name": ref["name"], "subject": ref["subject"], "version": ref["version"]}
            ref["version"] = self._reference_target(ref)[0]  # "latest" / -1 made concrete
            refs.append(ref)
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise invalid_schema(f"not JSON: {e}") from None
        if schema_type == "AVRO":
            try:
                named = {}
                self._parse_references(refs, named)
                fastavro.parse_schema(parsed, named_schemas=named)
            except ApiError:
                raise
            except Exception as e:  # fastavro raises several types for a bad schema
                raise invalid_schema(f"{type(e).__name__}: {e}") from None
        elif not isinstance(parsed, (dict, bool)):
            raise invalid_schema("a JSON schema must be a JSON object or boolean")
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        key = json.dumps([schema_type, canonical,
                          [[r["name"], r["subject"], r["version"]] for r in refs]])
        stored = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
        return key, stored, schema_type, refs

    def _describe(self, schema_id, subject=None, version=None):
        s = self.schemas[schema_id]
        out = {}
        if subject is not None:
            out["subject"] = subject
            out["version"] = version
        out["id"] = schema_id
        if s["schemaType"] != "AVRO":
            out["schemaType"] = s["schemaType"]
        if s["references"]:
            out["references"] = s["references"]
        out["schema"] = s["schema"]
        return out

    # -- operations -------------------------------------------------------------

    def register(self, subject, body):
        with self.lock:
            key, stored, schema_type, refs = self._prepare(body)
            schema_id = self.by_key.get(key)
            if schema_id is None:
                schema_id = len(self.schemas) + 1
                self.schemas[schema_id] = {"schema": stored, "schemaType": schema_type,
                                           "references": refs, "key": key}
                self.by_key[key] = schema_id
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return {"id": schema_id}

    def lookup(self, subject, body):
        with self.lock:
            key = self._prepare(body)[0]
            versions = self._versions(subject)
            schema_id = self.by_key.get(key)
            if schema_id is None or schema_id not in versions:
                raise schema_not_found()
            return self._describe(schema_id, subject, versions.index(schema_id) + 1)

    def subject_names(self, prefix, deleted_only):
        with self.lock:
            if deleted_only:
                return []
            return sorted(s for s in self.subjects if s.startswith(prefix))

    def version_numbers(self, subject):
        with self.lock:
            return list(range(1, len(self._versions(subject)) + 1))

    def version(self, subject, text):
        with self.lock:
            index = self._version_index(subject, text)
            return self._describe(self.subjects[subject][index], subject, index + 1)

    def by_id(self, text):
        with self.lock:
            try:
                schema_id = int(text)
            except ValueError:
                raise schema_not_found(text) from None
            if schema_id not in self.schemas:
                raise schema_not_found(schema_id)
            return self._describe(schema_id)

    def id_versions(self, text, subject_filter):
        """[{"subject", "version"}] of every subject version holding schema `text`."""
        schema_id = self.by_id(text)["id"]
        with self.lock:
            return [{"subject": s, "version": versions.index(schema_id) + 1}
                    for s, versions in sorted(self.subjects.items())
                    if schema_id in versions and (subject_filter is None or s == subject_filter)]

    def max_id(self):
        with self.lock:
            return len(self.schemas)

    def get_compatibility(self, subject=None):
        with self.lock:
            if subject is not None and subject in self.subject_compatibility:
                return self.subject_compatibility[subject]
            return self.compatibility

    def set_compatibility(self, subject, body):
        level = None
        if isinstance(body, dict):
            level = body.get("compatibility", body.get("compatibilityLevel"))
        if not isinstance(level, str) or level.upper() not in COMPATIBILITY_LEVELS:
            raise ApiError(
                422, 42203,
                "Invalid compatibility level. Valid values are none, backward, forward, full, "
                "backward_transitive, forward_transitive, and full_transitive",
            )
        level = level.upper()
        with self.lock:
            if subject is None:
                self.compatibility = level
            else:
                self.subject_compatibility[subject] = level
        return {"compatibility": level}


def page(items, query):
    """Applies the offset and limit query parameters to a list."""
    try:
        offset = max(0, int(query.get("offset", "0")))
        limit = int(query.get("limit", "-1"))
    except ValueError:
        return items
    items = items[offset:]
    return items if limit < 0 else items[:limit]


def truthy(value):
    return str(value).strip().lower() == "true"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "twinflow-test-registry"

    def version_string(self):
        return self.server_version

    # Set on the class by make_server.
    store = None
    credentials = None  # (user, password) or None

    def log_message(self, format, *args):  # noqa: A002 - the base class names it so
        pass  # one line per request is written by reply()

    def log_request(self, code="-", size="-"):
        pass

    def do_GET(self):
        self.handle_request("GET")

    def do_POST(self):
        self.handle_request("POST")

    def do_PUT(self):
        self.handle_request("PUT")

    def do_DELETE(self):
        self.handle_request("DELETE")

    def do_HEAD(self):
        self.handle_request("HEAD")

    def do_PATCH(self):
        self.handle_request("PATCH")

    # -- plumbing --------------------------------------------------------------

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(self, method, status, payload, raw=False):
        body = b"" if payload is None else (
            payload.encode("utf-8") if raw else json.dumps(payload).encode("utf-8"))
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="SchemaRegistry"')
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
        try:
            print(f"{method} {self.path} -> {status}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def authorized(self):
        if self.credentials is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        want_user, want_password = self.credentials
        return bool(sep) and hmac.compare_digest(user.encode(), want_user.encode()) \
            and hmac.compare_digest(password.encode(), want_password.encode())

    def handle_request(self, method):
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self.reply(method, 400, {"error_code": 400, "message": "Unreadable request body"})
            return
        try:
            if not self.authorized():
                raise ApiError(401, 401, "Unauthorized")
            status, payload, raw = self.route(method, body)
        except ApiError as e:
            status, payload, raw = e.status, {"error_code": e.code, "message": e.message}, False
        except Exception as e:  # a bug here must still answer, as a 500
            status, raw = 500, False
            payload = {"error_code": 50001, "message": f"Error in the backend data store: {e!r}"}
        self.reply(method, status, payload, raw)

    def json_body(self, body):
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type and content_type not in ACCEPTED_CONTENT_TYPES:
            raise ApiError(415, 415, "HTTP 415 Unsupported Media Type")
        try:
            return json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, 400, f"Unrecognized request body: {e}") from None

    def route(self, method, body):
        """Returns (status, payload, raw): raw means payload is text sent as it is."""
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")]
        while parts and parts[0] == "":
            parts.pop(0)
        while parts and parts[-1] == "":
            parts.pop()
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        store = self.store
        n = len(parts)
        head = parts[0] if parts else ""

        if method in ("GET", "HEAD"):
            if n == 0:
                return 200, {}, False
            if head == "subjects":
                if n == 1:
                    names = store.subject_names(query.get("subjectPrefix", ""),
                                                truthy(query.get("deleted_only")))
                    return 200, page(names, query), False
                if n == 3 and parts[2] == "versions":
                    return 200, page(store.version_numbers(parts[1]), query), False
                if n == 4 and parts[2] == "versions":
                    return 200, store.version(parts[1], parts[3]), False
                if n == 5 and parts[2] == "versions" and parts[4] == "schema":
                    return 200, store.version(parts[1], parts[3])["schema"], True
            if head == "schemas":
                if n == 2 and parts[1] == "types":
                    return 200, list(SCHEMA_TYPES), False
                if n >= 3 and parts[1] == "ids":
                    if n == 3:
                        found = store.by_id(parts[2])
                        if truthy(query.get("fetchMaxId")):
                            found["maxId"] = store.max_id()
                        return 200, found, False
                    if n == 4 and parts[3] == "schema":
                        return 200, store.by_id(parts[2])["schema"], True
                    if n == 4 and parts[3] == "versions":
                        found = store.id_versions(parts[2], query.get("subject"))
                        return 200, page(found, query), False
                    if n == 4 and parts[3] == "subjects":
                        found = store.id_versions(parts[2], query.get("subject"))
                        return 200, page(sorted({v["subject"] for v in found}), query), False
            if head == "config" and n in (1, 2):
                subject = parts[1] if n == 2 else None
                return 200, {"compatibilityLevel": store.get_compatibility(subject)}, False
            if head == "associations" and n == 4 and parts[1] == "resources":
                # No subject is ever associated with a resource here: clients using the
                # associated subject name strategy fall back to <topic>-value.
                return 200, [], False

        if method == "POST" and head == "subjects":
            if n == 3 and parts[2] == "versions":
                return 200, store.register(parts[1], self.json_body(body)), False
            if n == 2:
                return 200, store.lookup(parts[1], self.json_body(body)), False

        if method == "PUT" and head == "config" and n in (1, 2):
            subject = parts[1] if n == 2 else None
            return 200, store.set_compatibility(subject, self.json_body(body)), False

        raise ApiError(
            404, 404,
            f"HTTP 404 Not Found: {method} {url.path} is not part of the REST subset served here",
        )


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hung up mid-request is no reason for a traceback.
        error = sys.exc_info()[1]
        try:
            print(f"connection from {client_address[0]}:{client_address[1]} failed: {error!r}",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def make_server(port, credentials):
    handler = type("RegistryHandler", (Handler,), {
        "store": Store(),
        "credentials": credentials,
    })
    return Server(("127.0.0.1", port), handler)


def watch_stdin(stop):
    """Sets `stop` when stdin reaches end of file, if stdin is a pipe, socket or terminal."""
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        return

    def run():
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=run, name="stdin-watch", daemon=True).start()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0,
                   help="TCP port on 127.0.0.1 (default 0: a free port)")
    p.add_argument("--user", metavar="NAME:PASSWORD",
                   help="require HTTP basic auth with these credentials on every request")
    args = p.parse_args()
    if not 0 <= args.port <= 65535:
        p.error("--port must be 0..65535")
    if args.user is not None and ":" not in args.user:
        p.error("--user must be NAME:PASSWORD")
    return args


def main():
    args = parse_args()
    credentials = tuple(args.user.split(":", 1)) if args.user is not None else None
    try:
        server = make_server(args.port, credentials)
    except OSError as e:
        print(f"registry: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        sys.exit(1)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               name="serve", daemon=True)
    serving.start()
    watch_stdin(stop)

    print(f"listening http://127.0.0.1:{server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
