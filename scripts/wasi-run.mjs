// Runs a wasm32-wasip1 command module under node's WASI (V8), passing the arguments:
//   node --no-liftoff scripts/wasi-run.mjs MODULE.wasm [ARGS...]
// (--no-liftoff: TurboFan only, as Envoy runs wasm). Exits with the module's exit code.
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import { argv, env, exit } from "node:process";

const [path, ...args] = argv.slice(2);
if (!path) {
  console.error("usage: node scripts/wasi-run.mjs MODULE.wasm [ARGS...]");
  exit(2);
}
const wasi = new WASI({ version: "preview1", args: [path, ...args], env, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(path));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
exit(wasi.start(instance));
