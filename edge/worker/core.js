// The core for Cloudflare Workers and workerd: wasm-bindgen's --target module glue, which
// imports its wasm with `import source` (workerd and wrangler understand it), and the
// configuration parsed once per isolate (engine.js).
import * as core from "../dist/module/idemgate_edge.js";
import { engines } from "./engine.js";

export { core };

/** `{engine}` for the configuration `source` (env.IDEMGATE_CONFIG), `{error}` otherwise. */
export const engineFor = engines(core);
