-- wrk script for bench/bench_ratios.py.
--   wrk ... -s bench/wrk_runs.lua URL -- MODE PATH TOKEN PREFIX
-- MODE "post": POST PATH with an echo run body and a fresh Idempotency-Key per
-- request (as DPP's clients send one); MODE "get": GET PATH.
-- TOKEN: the API key ("-" for none; "@FILE": one key per line, the requests
-- cycling through them, i.e. many tenants). PREFIX makes the keys unique per run.
-- done() prints one machine-readable line the bench script parses:
--   RESULT requests duration_us p50_us p99_us non_2xx_3xx socket_errors

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

local mode, path, prefix, headers, body, cached
local counter = 0
local tokens = {}

function init(args)
  mode, path, prefix = args[1], args[2], args[4] .. "-" .. tostring(thread_id) .. "-"
  headers = {}
  if args[3]:sub(1, 1) == "@" then
    for line in io.lines(args[3]:sub(2)) do
      table.insert(tokens, "Bearer " .. line)
    end
  elseif args[3] ~= "-" then
    headers["Authorization"] = "Bearer " .. args[3]
  end
  if mode == "post" then
    headers["Content-Type"] = "application/json"
    body = '{"pack_type":"echo","inputs":{"payload":{"n":1}}}'
  else
    cached = wrk.format("GET", path, headers)
  end
end

function request()
  if cached then
    return cached
  end
  counter = counter + 1
  headers["Idempotency-Key"] = prefix .. counter
  if #tokens > 0 then
    headers["Authorization"] = tokens[counter % #tokens + 1]
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
