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
//   PORT, HOSTNAME         where to listen (8000, 0.0.0.0; Deno Deploy ignores them)
//
// Or embed it: `Deno.serve(await idemgate({ config, origin: "https://…", kv }))`.
import * as core from "../dist/web/idemgate_edge.js";
import { claims } from "./claims.js";
import { engines } from "./engine.js";
import { gate, originUrl } from "./gate.js";
import { kvStore } from "./kv.js";
import { enabled } from "./outcomes.js";

core.initSync({ module: await Deno.readFile(new URL("../dist/web/idemgate_edge_bg.wasm", import.meta.url)) });

const handle = gate(core);
const rules = claims(core);

/**
 * A request handler (`(request) => Promise<Response>`) for one configuration.
 * Options: `config` (a JSON string or object), `origin` (the origin's base URL), `kv` (a
 * Deno.Kv; default `Deno.openKv(kvPath)`), `kvPath`, `prefix` (the KV key prefix, default
 * ["idemgate"]), `logs` (default true).
 */
export async function idemgate({ config, origin, kv, kvPath, prefix, logs = true } = {}) {
  const { origin: resolved, error } = origin === undefined || origin === null || origin === ""
    ? { error: "no origin: set ORIGIN_URL" }
    : originUrl(origin);
  kv ??= await Deno.openKv(kvPath);
  const engineFor = engines(core); // one per handler: each keeps its own configuration
  const engine = () => engineFor(config);
  const host = {
    engine,
    store: kvStore(kv, rules, () => engine().engine, { prefix }),
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
  const handler = await idemgate({
    config: env("IDEMGATE_CONFIG"),
    origin: env("ORIGIN_URL"),
    kvPath: env("IDEMGATE_KV_PATH") || undefined,
    logs: enabled(env("IDEMGATE_OUTCOME_LOGS")),
  });
  const server = Deno.serve(
    {
      port: Number(env("PORT") ?? 8000),
      hostname: env("HOSTNAME") ?? "0.0.0.0",
      onListen: ({ hostname, port }) => console.log(`idemgate: listening on http://${hostname}:${port}/`),
    },
    handler,
  );
  const stop = async () => {
    await server.shutdown();
    handler.kv.close();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}
