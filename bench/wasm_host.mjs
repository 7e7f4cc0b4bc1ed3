// A minimal proxy-wasm host (ABI 0.2.1) in Node's V8, to see where idemgate's own wasm code
// spends its time. Envoy's binary is stripped and V8 gives perf no names for wasm code, so
// `make bench`'s profile can only say how much of Envoy's CPU is generated code; this runs
// the same module through the same callbacks as Envoy does for one request (idemgate loaded
// as shipped: one filter, "idemgate", with allow_on_headers_stop_iteration, so it holds the
// request headers and gets the body) with an in-memory shared data, and V8's CPU profiler
// names every wasm function (use a build that keeps the
// name section, e.g. target/sizes/filter.named.wasm from `make sizes`).
//
//   node --no-liftoff bench/wasm_host.mjs WASM [--scenario replay|first] [--size 1024]
//        [--requests 20000] [--config JSON] [--count-hostcalls]
//   node --no-liftoff bench/wasm_host.mjs ... --cpu-profile OUT.cpuprofile   then
//   python3 bench/wasm_profile.py OUT.cpuprofile
// (the profile covers the measured requests only, not loading, configuring or warming up)
//
// Prints µs per request in V8 (the wasm code, V8's wasm<->JS transitions and this host's
// JavaScript, which stands in for Envoy's C++ hostcall handlers). Not a model of Envoy's
// cost: a way to rank idemgate's own functions. Envoy runs wasm with TurboFan only, hence
// --no-liftoff.
import { readFileSync, writeFileSync } from "node:fs";
import { randomFillSync } from "node:crypto";
import { Session } from "node:inspector/promises";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const wasmPath = args.find((a, i) => !a.startsWith("--") && (i === 0 || !args[i - 1].startsWith("--")));
if (!wasmPath) {
  console.error("usage: node --no-liftoff bench/wasm_host.mjs WASM [--scenario replay|first] [--size N] [--requests N] [--config JSON]");
  process.exit(2);
}
const scenario = opt("scenario", "replay");
if (!["replay", "first"].includes(scenario)) {
  console.error(`--scenario must be replay or first, got ${scenario}`);
  process.exit(2);
}
const size = Number(opt("size", "1024"));
const requests = Number(opt("requests", "20000"));
const pluginConfig = opt("config", '{"store":{"namespace":"hostbench"}}');
const cpuProfile = opt("cpu-profile", "");

const enc = new TextEncoder();
const dec = new TextDecoder();
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8, UNIMPLEMENTED = 10;

let inst;
let mem = () => new Uint8Array(inst.exports.memory.buffer);
let view = () => new DataView(inst.exports.memory.buffer);
const str = (p, n) => dec.decode(mem().subarray(p, p + n));
const bytes = (p, n) => mem().slice(p, p + n);

// Copies `data` into the VM (proxy_on_memory_allocate) and writes its address and size.
function give(data, retPtr, retSize) {
  const p = inst.exports.proxy_on_memory_allocate(data.length);
  mem().set(data, p);
  const v = view();
  v.setUint32(retPtr, p, true);
  v.setUint32(retSize, data.length, true);
  return OK;
}

const serialized = new WeakMap(); // header arrays are replaced, never changed in place
function serializeMap(pairs) {
  let out = serialized.get(pairs);
  if (!out) {
    out = serializeMapUncached(pairs);
    serialized.set(pairs, out);
  }
  return out;
}

function serializeMapUncached(pairs) {
  const parts = pairs.map(([k, v]) => [enc.encode(k), typeof v === "string" ? enc.encode(v) : v]);
  let len = 4 + parts.length * 8;
  for (const [k, v] of parts) len += k.length + 1 + v.length + 1;
  const out = new Uint8Array(len);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, parts.length, true);
  let o = 4;
  for (const [k, v] of parts) {
    dv.setUint32(o, k.length, true);
    dv.setUint32(o + 4, v.length, true);
    o += 8;
  }
  for (const [k, v] of parts) {
    out.set(k, o);
    o += k.length + 1;
    out.set(v, o);
    o += v.length + 1;
  }
  return out;
}

function parseMap(p, n) {
  const b = bytes(p, n);
  const dv = new DataView(b.buffer);
  const count = dv.getUint32(0, true);
  const lens = [];
  for (let i = 0; i < count; i++) lens.push([dv.getUint32(4 + i * 8, true), dv.getUint32(8 + i * 8, true)]);
  let o = 4 + count * 8;
  const out = [];
  for (const [kl, vl] of lens) {
    const k = dec.decode(b.subarray(o, o + kl));
    o += kl + 1;
    const v = dec.decode(b.subarray(o, o + vl));
    o += vl + 1;
    out.push([k, v]);
  }
  return out;
}

// ---------------------------------------------------------------- host state
const shared = new Map(); // key -> { value: Uint8Array, cas }
let casCounter = 1;
let effective = 0;
const rootOf = new Map(); // context id -> root context id
const rootIds = new Map(); // root context id -> plugin root_id
const stream = new Map(); // http context id -> { reqHeaders, respHeaders, reqBody, respBody, local, continued }
let plugin = { 1: enc.encode(pluginConfig) };
const logs = [];
const counts = { hostcalls: 0 };
let nowNs = BigInt(Date.now()) * 1_000_000n;

function st() {
  const s = stream.get(effective);
  if (!s) throw new Error(`no stream for effective context ${effective}`);
  return s;
}
function headerMap(type) {
  const s = st();
  switch (type) {
    case 0: return s.reqHeaders;
    case 2: return s.respHeaders;
    default: return [];
  }
}
function setHeaderMap(type, pairs) {
  const s = st();
  if (type === 0) s.reqHeaders = pairs;
  else if (type === 2) s.respHeaders = pairs;
}

const env = {
  proxy_log(level, p, n) { counts.hostcalls++; logs.push(`[${level}] ${str(p, n)}`); return OK; },
  proxy_get_log_level(ret) { counts.hostcalls++; view().setUint32(ret, 3, true); return OK; }, // warn, as the bench
  proxy_get_current_time_nanoseconds(ret) {
    counts.hostcalls++;
    nowNs += 1000n;
    view().setBigUint64(ret, nowNs, true);
    return OK;
  },
  proxy_set_tick_period_milliseconds() { counts.hostcalls++; return OK; },
  proxy_define_metric(_type, _p, _n, ret) {
    counts.hostcalls++;
    view().setUint32(ret, ++casCounter, true);
    return OK;
  },
  proxy_increment_metric() { counts.hostcalls++; return OK; },
  proxy_get_property(p, n, retP, retN) {
    counts.hostcalls++;
    const path = str(p, n).split("\0").filter(Boolean).join(".");
    if (path === "plugin_root_id") return give(enc.encode(rootIds.get(rootOf.get(effective) ?? effective) ?? ""), retP, retN);
    if (path === "response.code_details") {
      const s = stream.get(effective);
      return give(enc.encode(s && s.local ? "idemgate" : "via_upstream"), retP, retN);
    }
    return NOT_FOUND;
  },
  proxy_set_property() { counts.hostcalls++; return OK; },
  proxy_get_buffer_bytes(type, start, max, retP, retN) {
    counts.hostcalls++;
    let b;
    if (type === 7) b = plugin[rootOf.get(effective) ?? effective] ?? new Uint8Array();
    else if (type === 6) b = new Uint8Array();
    else if (type === 0) b = st().reqBody;
    else if (type === 1) b = st().respBody;
    else return NOT_FOUND;
    b = b.subarray(start >>> 0, Math.min(b.length, (start >>> 0) + (max >>> 0))); // u32 arguments arrive as i32
    if (b.length === 0) return NOT_FOUND;
    return give(b, retP, retN);
  },
  proxy_set_buffer_bytes() { counts.hostcalls++; return OK; },
  proxy_get_header_map_pairs(type, retP, retN) { counts.hostcalls++; return give(serializeMap(headerMap(type)), retP, retN); },
  proxy_set_header_map_pairs(type, p, n) { counts.hostcalls++; setHeaderMap(type, parseMap(p, n)); return OK; },
  proxy_get_header_map_value(type, p, n, retP, retN) {
    counts.hostcalls++;
    const k = str(p, n);
    const hit = headerMap(type).find(([name]) => name === k);
    return hit ? give(enc.encode(hit[1]), retP, retN) : NOT_FOUND;
  },
  proxy_replace_header_map_value(type, p, n, vp, vn) {
    counts.hostcalls++;
    const k = str(p, n);
    setHeaderMap(type, headerMap(type).filter(([name]) => name !== k).concat([[k, str(vp, vn)]]));
    return OK;
  },
  proxy_add_header_map_value(type, p, n, vp, vn) {
    counts.hostcalls++;
    setHeaderMap(type, headerMap(type).concat([[str(p, n), str(vp, vn)]]));
    return OK;
  },
  proxy_remove_header_map_value(type, p, n) {
    counts.hostcalls++;
    const k = str(p, n);
    setHeaderMap(type, headerMap(type).filter(([name]) => name !== k));
    return OK;
  },
  proxy_get_shared_data(p, n, retP, retN, retCas) {
    counts.hostcalls++;
    const e = shared.get(str(p, n));
    if (!e) return NOT_FOUND;
    view().setUint32(retCas, e.cas, true);
    return give(e.value, retP, retN);
  },
  proxy_set_shared_data(p, n, vp, vn, cas) {
    counts.hostcalls++;
    const k = str(p, n);
    const e = shared.get(k);
    // as Envoy: a CAS on an absent key is ignored
    if (e && cas !== 0 && e.cas !== cas) return CAS_MISMATCH;
    shared.set(k, { value: bytes(vp, vn), cas: ++casCounter });
    return OK;
  },
  proxy_set_effective_context(id) { counts.hostcalls++; effective = id; return OK; },
  proxy_continue_stream() { counts.hostcalls++; st().continued = true; return OK; },
  proxy_close_stream() { counts.hostcalls++; return OK; },
  proxy_send_local_response(status, _dp, _dn, bp, bn, hp, hn) {
    counts.hostcalls++;
    const s = st();
    s.local = { status, body: bytes(bp, bn), headers: parseMap(hp, hn) };
    return OK;
  },
  proxy_get_status() { counts.hostcalls++; return UNIMPLEMENTED; },
  proxy_http_call() { counts.hostcalls++; return UNIMPLEMENTED; },
  proxy_grpc_cancel() { return UNIMPLEMENTED; },
  proxy_grpc_close() { return UNIMPLEMENTED; },
  proxy_grpc_send() { return UNIMPLEMENTED; },
  // the filter registers a wake-up queue per root context; a single-filter request never
  // posts to it (nothing to wake), so it stays empty here
  proxy_register_shared_queue(_p, _n, ret) { counts.hostcalls++; view().setUint32(ret, 1, true); return OK; },
  proxy_enqueue_shared_queue() { counts.hostcalls++; return OK; },
  proxy_dequeue_shared_queue() { counts.hostcalls++; return 7; }, // Empty
  proxy_done() { return OK; },
};
const wasi = {
  random_get(p, n) { randomFillSync(mem().subarray(p, p + n)); return 0; },
  environ_sizes_get(a, b) { view().setUint32(a, 0, true); view().setUint32(b, 0, true); return 0; },
  environ_get() { return 0; },
  fd_write(fd, iovs, n, ret) {
    let total = 0;
    for (let i = 0; i < n; i++) {
      const p = view().getUint32(iovs + i * 8, true), l = view().getUint32(iovs + i * 8 + 4, true);
      process.stderr.write(bytes(p, l));
      total += l;
    }
    view().setUint32(ret, total, true);
    return 0;
  },
  proc_exit(code) { throw new Error(`proc_exit(${code})`); },
};

const byName = {};
if (args.includes("--count-hostcalls")) {
  for (const [name, f] of Object.entries(env)) {
    env[name] = (...a) => {
      byName[name] = (byName[name] || 0) + 1;
      return f(...a);
    };
  }
}
const module = new WebAssembly.Module(readFileSync(wasmPath));
for (const imp of WebAssembly.Module.imports(module)) {
  // other SDK builds import more of the ABI: what this host does not model is unimplemented
  if (imp.kind === "function" && imp.module === "env" && !(imp.name in env)) env[imp.name] = () => UNIMPLEMENTED;
}
inst = new WebAssembly.Instance(module, { env, wasi_snapshot_preview1: wasi });
const x = inst.exports;
x._initialize?.();

// One root context, as Envoy creates it for the filter.
for (const [id, rootId] of [[1, "idemgate"]]) {
  rootIds.set(id, rootId);
  effective = id;
  x.proxy_on_context_create(id, 0);
  x.proxy_on_vm_start(id, 0);
  if (!x.proxy_on_configure(id, plugin[id].length)) {
    console.error(logs.join("\n"));
    throw new Error(`proxy_on_configure refused the configuration of ${rootId}`);
  }
}

const body = enc.encode(JSON.stringify({ pad: "x".repeat(Math.max(0, size - 10)) }).slice(0, size));
const respBody = enc.encode('{"ok":true}');
let nextId = 10;

function call(ctx, fn, ...a) {
  effective = ctx;
  return x[fn](ctx, ...a);
}

// One request through the filter, in Envoy's order. Returns the local reply, if any.
const headersByKey = new Map();
function requestHeaders(key) {
  let h = headersByKey.get(key);
  if (!h) {
    h = [
      [":method", "POST"], [":path", "/bench"], [":authority", "127.0.0.1"], [":scheme", "http"],
      ["user-agent", "wrk"], ["content-type", "application/json"], ["content-length", String(body.length)],
      ["idempotency-key", key], ["x-request-id", "5d0f7a58-9f59-4bd2-8c3e-1f0a8a3c1d2e"],
    ];
    if (headersByKey.size < 4) headersByKey.set(key, h);
  }
  return h;
}
const upstreamHeaders = [[":status", "200"], ["content-type", "application/json"], ["content-length", "11"]];

function request(key) {
  const r = nextId++;
  rootOf.set(r, 1);
  stream.set(r, {
    reqHeaders: requestHeaders(key),
    respHeaders: [], reqBody: body, respBody: new Uint8Array(), local: null, continued: false,
  });
  effective = r;
  x.proxy_on_context_create(r, 1);
  // the filter holds the headers (Pause) until it has read the body and decided
  if (call(r, "proxy_on_request_headers", 9, 0) !== 1) throw new Error("the filter did not hold the headers");
  const action = call(r, "proxy_on_request_body", body.length, 1);
  const s = stream.get(r);
  const local = s.local;
  if (!local && action !== 0) throw new Error("the filter neither answered nor let the request go on");
  s.respHeaders = local ? [[":status", String(local.status)], ...local.headers] : upstreamHeaders;
  s.respBody = local ? local.body : respBody;
  call(r, "proxy_on_response_headers", s.respHeaders.length, 0);
  call(r, "proxy_on_response_body", s.respBody.length, 1);
  call(r, "proxy_on_log");
  call(r, "proxy_on_done");
  call(r, "proxy_on_delete");
  stream.delete(r);
  rootOf.delete(r);
  return local;
}

const primeKey = "bench-replay-key";
const keyFor = (i) => (scenario === "replay" ? primeKey : `bench-first-${i}`);
const first = request(keyFor(-1));
if (first) throw new Error(`the priming request was answered locally: ${first.status} ${dec.decode(first.body)}`);
const check = request(keyFor(-2));
if (scenario === "replay" && (!check || !check.headers.some(([k, v]) => k === "idempotent-replayed" && v === "true"))) {
  throw new Error(`not a replay: ${JSON.stringify(check && { status: check.status, body: dec.decode(check.body) })}\n${logs.join("\n")}`);
}
if (scenario === "first" && check) throw new Error(`first request answered locally: ${check.status} ${dec.decode(check.body)}`);

const warm = Math.min(5000, requests);
for (let i = 0; i < warm; i++) request(keyFor(`w${i}`));
counts.hostcalls = 0;
for (const k of Object.keys(byName)) delete byName[k];
let session;
if (cpuProfile) {
  session = new Session();
  session.connect();
  await session.post("Profiler.enable");
  await session.post("Profiler.setSamplingInterval", { interval: 100 });
  await session.post("Profiler.start");
}
const t0 = process.hrtime.bigint();
for (let i = 0; i < requests; i++) request(keyFor(i));
const us = Number(process.hrtime.bigint() - t0) / 1000 / requests;
if (session) {
  const { profile } = await session.post("Profiler.stop");
  writeFileSync(cpuProfile, JSON.stringify(profile));
  session.disconnect();
}
console.log(JSON.stringify({
  scenario, size, requests, us_per_request: Number(us.toFixed(2)),
  hostcalls_per_request: Number((counts.hostcalls / requests).toFixed(1)),
  errors_logged: logs.filter((l) => l.startsWith("[4]") || l.startsWith("[5]")).length,
  ...(Object.keys(byName).length
    ? { hostcalls: Object.fromEntries(Object.entries(byName).map(([k, v]) => [k, Number((v / requests).toFixed(2))])) }
    : {}),
}));
