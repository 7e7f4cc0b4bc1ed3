// idemgate on Deno (and Deno Deploy): gate.js with the core's --target web build and Deno
// KV as its store (kv.js).
//
//   deno run --unstable-kv --allow-net --allow-env --allow-read --allow-write worker/deno.js
//
// Environment:
//   ORIGIN_URL             the origin's base URL (required)
//   IDEMGATE_CONFIG        the configuration (same JSON as the Envoy filter's); absent = defaults
//   IDEMGATE_KV_PATH       the Deno KV database (a file: local SQLite); absent = Deno.openKv()'s
//                          default (on Deno Deploy: the KV database attached to the app)
//   IDEMGATE_OUTCOME_LOGS  "off" silences the per-request JSON log line
//   PORT, IDEMGATE_HOSTNAME  where to listen (8000, 0.0.0.0; Deno Deploy ignores them)
//
// Or embed it: `Deno.serve(await idemgate({ config, origin: "https://…", kv }))`.
import * as core from "../dist/web/idemgate_edge.js";
import { claims } from "./claims.js";
import { engines } from "./engine.js";
import { gate, originUrl } from "./gate.js";
import { kvStore, openKv } from "./kv.js";
import { enabled } from "./outcomes.js";

core.initSync({ module: await Deno.readFile(new URL("../dist/web/idemgate_edge_bg.wasm", import.meta.url)) });

const handle = gate(core);
const rules = claims(core);

/**
 * A request handler (`(request) => Promise<Response>`) for one configuration.
 * Options: `config` (a JSON string or object), `origin` (the origin's base URL), `kv` (a
 * Deno.Kv; default `Deno.openKv(kvPath)`), `kvPath`, `prefix` (the KV key prefix, default
 * ["idemgate"], followed by the configuration's store namespace), `logs` (default true).
 */
export async function idemgate({ config, origin, kv, kvPath, prefix, logs = true } = {}) {
  const { origin: resolved, error } = origin === undefined || origin === null || origin === ""
    ? { error: "no origin: set ORIGIN_URL" }
    : originUrl(origin);
  kv ??= await openKv(kvPath);
  const engineFor = engines(core); // one per handler: each keeps its own configuration
  const engine = () => engineFor(config);
  // Keys are scoped by method, route, credentials and key, not by namespace: handlers sharing
  // one database keep their namespaces apart under the prefix.
  const namespace = engine().engine?.namespace ?? "";
  const host = {
    engine,
    store: kvStore(kv, rules, () => engine().engine, { prefix: [...(prefix ?? ["idemgate"]), namespace] }),
    origin: resolved,
    misconfigured: error ?? null,
    logs,
  };
  const handler = (request) => handle(request, host);
  handler.kv = kv;
  return handler;
}

if (import.meta.main) {
  const env = (name) => Deno.env.get(name);
  const fail = (message) => {
    console.error(`idemgate: ${message}`);
    Deno.exit(2);
  };
  const port = Number(env("PORT") || 8000);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`PORT must be a port number (0..65535), got ${JSON.stringify(env("PORT"))}`);
  const kvPath = env("IDEMGATE_KV_PATH") || undefined;
  let kv;
  try {
    kv = await openKv(kvPath);
  } catch (e) {
    fail(`cannot open Deno KV${kvPath ? ` at ${kvPath}` : ""}: ${e && e.message ? e.message : e}`);
  }
  const handler = await idemgate({
    config: env("IDEMGATE_CONFIG"),
    origin: env("ORIGIN_URL"),
    kv,
    logs: enabled(env("IDEMGATE_OUTCOME_LOGS")),
  });
  const server = Deno.serve(
    {
      port,
      hostname: env("IDEMGATE_HOSTNAME") || "0.0.0.0",
      onListen: ({ hostname, port }) => console.log(`idemgate: listening on http://${hostname}:${port}/`),
    },
    handler,
  );
  const stop = async () => {
    await server.shutdown();
    kv.close();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}
