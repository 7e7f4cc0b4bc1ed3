# idemgate edge worker in plain workerd (`make run-edge`, and the smoke test in
# edge/test/). Serve from the repository root after `make edge`:
#
#   IDEMGATE_CONFIG="$(cat envoy/profiles/default.json)" \
#     edge/node_modules/.bin/workerd serve edge/worker/workerd.capnp \
#       --directory-path do-storage=/var/tmp/idemgate-edge-do \
#       [--socket-addr http=127.0.0.1:8787] [--external-addr origin=127.0.0.1:8080]
#
# The Durable Objects keep their records on local disk (localDisk), so stored responses
# survive a restart. The origin is an external service (workerd refuses fetch() to
# loopback addresses from a worker otherwise).
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "idemgate", worker = .idemgate),
    (name = "origin", external = (address = "127.0.0.1:8080", http = ())),
    (name = "do-storage", disk = (path = "/var/tmp/idemgate-edge-do", writable = true)),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8787", http = (), service = "idemgate")],
);

const idemgate :Workerd.Worker = (
  modules = [
    (name = "worker/index.js", esModule = embed "index.js"),
    (name = "worker/core.js", esModule = embed "core.js"),
    (name = "worker/engine.js", esModule = embed "engine.js"),
    (name = "worker/gate.js", esModule = embed "gate.js"),
    (name = "worker/outcomes.js", esModule = embed "outcomes.js"),
    (name = "worker/claims.js", esModule = embed "claims.js"),
    (name = "worker/store.js", esModule = embed "store.js"),
    (name = "dist/module/idemgate_edge.js", esModule = embed "../dist/module/idemgate_edge.js"),
    (name = "dist/module/idemgate_edge_bg.wasm", wasm = embed "../dist/module/idemgate_edge_bg.wasm"),
  ],
  compatibilityDate = "2025-04-01",
  bindings = [
    (name = "IDEMGATE_CONFIG", fromEnvironment = "IDEMGATE_CONFIG"),
    (name = "ORIGIN", service = "origin"),
    (name = "IDEMGATE_STORE", durableObjectNamespace = "IdempotencyStore"),
  ],
  durableObjectNamespaces = [(className = "IdempotencyStore", uniqueKey = "idemgate-edge-IdempotencyStore")],
  durableObjectStorage = (localDisk = "do-storage"),
);
