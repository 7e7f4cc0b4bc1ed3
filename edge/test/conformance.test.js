// The conformance vectors (conformance.js) on workerd: the worker in Miniflare, one worker
// per profile variant, each with its own Durable Objects.
import { conformance } from "./conformance.js";
import { send, startMiniflare, worker } from "./helpers.js";

conformance("workerd", async (variants, origin) => {
  const mf = await startMiniflare(variants.map(({ name, config }) => worker(name, config, origin)));
  return {
    send: (name, method, path, opts) => send(mf, name, method, path, opts),
    stop: () => mf.dispose(),
  };
});
