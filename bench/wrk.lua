-- wrk script for `make bench` (bench/envoy_bench.py).
--
--   wrk ... -s bench/wrk.lua URL -- <mode> <prefix> <body bytes> [<path>]
--
-- Every request is a POST <path> (default /orders; the alternative, idempotent-proxy-server,
-- takes /URL_<NAME>) with a JSON body of exactly <body bytes> bytes and an
-- Idempotency-Key header:
--   unique   <prefix>-<n>, n counting from 1 (a new key per request; wrk runs 1 thread)
--   fixed    <prefix>   (the same key every time: replays once the first one is stored)
-- The same request shape is sent in every scenario (passthrough and floor included), so
-- the client's own work does not differ between them.
--
-- done() prints one line `BENCH_JSON {...}` with the counts and latency percentiles (us).

local counter = 0
local mode, prefix, body, path
local headers = {}

function init(args)
  mode = args[1] or "unique"
  prefix = args[2] or "bench"
  local n = tonumber(args[3] or "1024")
  path = args[4] or "/orders"
  local head, tail = '{"order":"bench","pad":"', '"}'
  local pad = n - #head - #tail
  if pad < 0 then pad = 0 end
  body = head .. string.rep("x", pad) .. tail
end

function request()
  counter = counter + 1
  local key = prefix
  if mode == "unique" then
    key = prefix .. "-" .. counter
  end
  headers["Idempotency-Key"] = key
  headers["Content-Type"] = "application/json"
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
