// Test server for edge/test/deno.test.js (a .ts file, so node --test does not take it for a
// test): one Deno.serve listener per variant, each idemgate(…) from worker/deno.js with its
// own configuration, all on one Deno KV database. The spec comes as JSON in
// IDEMGATE_TEST_SPEC: {kvPath, origin, variants: {name: {config, origin?, logs?}}}. Prints
// `READY {"name": port, …}` once every listener is up.
import { idemgate } from "../worker/deno.js";
import { openKv } from "../worker/kv.js";

const spec = JSON.parse(Deno.env.get("IDEMGATE_TEST_SPEC") ?? "{}");
const kv = await openKv(spec.kvPath);
const ports: Record<string, number> = {};
for (const [name, v] of Object.entries(spec.variants as Record<string, { config?: unknown; origin?: string; logs?: boolean }>)) {
  const handler = await idemgate({ config: v.config, origin: v.origin ?? spec.origin, kv, logs: v.logs ?? false });
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, handler);
  ports[name] = server.addr.port;
}
console.log(`READY ${JSON.stringify(ports)}`);
