// The configuration, parsed once per isolate, and the core's answers as Responses: shared by
// every host (core.js for Cloudflare, deno.js for Deno), which passes its build of the core.
//
// The configuration is the same JSON document as the Envoy filter's: a JSON string, or an
// object (a wrangler [vars] table). Absent or empty, it gives the defaults, as an empty filter
// configuration does. A refused configuration never throws out of the worker: every request
// gets a 500 problem naming the field, and the log says it once per isolate.

/** `engineFor(source)` for `core`: `{engine}` for a valid configuration, `{error}` (a
 * one-line message) otherwise; parsed again only when the source changes. */
export function engines(core) {
  let current = { source: undefined, engine: null, error: null };
  return function engineFor(source) {
    if (source === undefined || source === null) source = "";
    else if (typeof source !== "string") source = JSON.stringify(source);
    if (current.source === source) return current;
    let engine = null;
    let error = null;
    try {
      engine = new core.Engine(source);
      console.log(`idemgate: configured (${engine.summary})`);
    } catch (e) {
      error = `invalid configuration: ${e && e.message ? e.message : String(e)}`;
      console.error(`idemgate: ${error}`);
    }
    if (current.engine) current.engine.free();
    current = { source, engine, error };
    return current;
  };
}

export const NULL_BODY = new Set([101, 204, 205, 304]);

/** A Response from a core answer (and frees it). */
export function toResponse(answer) {
  const headers = new Headers();
  const flat = answer.headers;
  for (let i = 0; i + 1 < flat.length; i += 2) headers.append(flat[i], flat[i + 1]);
  const status = answer.status;
  const body = NULL_BODY.has(status) ? null : answer.body;
  answer.free();
  return new Response(body, { status, headers });
}

/** Headers as the lines `name\nvalue\n…` the core takes (one string crosses into the wasm;
 * Fetch header names and values never contain a line feed). */
export function lines(headers) {
  let out = "";
  for (const [name, value] of headers) out += `${name}\n${value}\n`;
  return out;
}
