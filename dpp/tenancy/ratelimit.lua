-- Rate limit checks for a batch of N requests of ONE tenant: GCRA (generic
-- cell rate algorithm) over up to two policies per request, decided and
-- recorded in one atomic call, in order — exactly as N calls of one request
-- each, made back to back, would decide them. See docs/rate-limits.md for why
-- GCRA, how the numbers are derived and why a batch keeps them exact.
--
-- ARGV[1]        = window in microseconds (60000000)
-- For request i (1..N):
-- KEYS[2i-1]     = the tenant policy's TAT key  <prefix>:ratelimit:{tenant_id}
-- KEYS[2i]       = the key policy's TAT key     <prefix>:ratelimit:{tenant_id}:key:<key_id>
--                  (always passed, so every key shares the {tenant_id} hash
--                   slot; untouched when the key quota is 0)
-- ARGV[2i]       = tenant quota: requests per window (>= 1)
-- ARGV[2i+1]     = key quota (>= 1), or 0 when the key has no lower limit of its own
--
-- A policy of quota q has emission interval T = ceil(window / q) microseconds
-- (integers throughout, so every comparison is exact) and burst capacity
-- q * T. Its state is the theoretical arrival time (TAT), microseconds since
-- the epoch. A request is allowed when TAT + T - q * T <= now for EVERY
-- policy; only then are its new TATs recorded, so a refused request costs
-- nothing. Time is Redis's own clock (TIME), the same for every replica, read
-- once: the batch's requests all arrive at that instant.
--
-- A request's TATs are those left by the requests before it in the batch
-- (kept in `tats`, read from Redis on first use); each changed key is written
-- once at the end with its final TAT, as the last of N calls would leave it.
--
-- Returns the N replies, in order, as one string of integers separated by
-- spaces, six per request: allowed (1|0), tightest (1 tenant | 2 key), quota,
-- remaining, reset_us, retry_after_us (0 when allowed). One string, not an
-- array: the client reads an array element by element in Python (redis-py's
-- parser: six reads per request, ~11 % of a loaded GET's CPU), a string in
-- one read. Every value is a whole number below 10^14 (microseconds within one
-- window, quotas of at most 10^6), which Lua's number format prints exactly.

local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local window = tonumber(ARGV[1])
assert(#KEYS >= 2 and #KEYS % 2 == 0 and #ARGV == #KEYS + 1, 'bad batch shape')
local count = #KEYS / 2

local tats = {}      -- key -> its TAT after the requests decided so far (at least now)
local recorded = {}  -- key -> the TAT to write: the keys an allowed request changed

local function evaluate(key, quota)
  local interval = math.ceil(window / quota)
  local capacity = interval * quota
  local tat = tats[key]
  if tat == nil then
    local stored = redis.call('GET', key)
    tat = now
    if stored then
      tat = math.max(tonumber(stored), now)
    end
    tats[key] = tat
  end
  local new_tat = tat + interval
  local allow_at = new_tat - capacity
  local policy = {key = key, quota = quota, new_tat = new_tat}
  if allow_at <= now then
    policy.allowed = true
    policy.remaining = math.floor((capacity - (new_tat - now)) / interval)
    policy.reset_us = new_tat - now
    policy.retry_after_us = 0
  else
    policy.allowed = false
    policy.remaining = 0
    policy.reset_us = tat - now
    policy.retry_after_us = allow_at - now
  end
  return policy
end

local replies = {}  -- six integers per request, in order

local function decide(tenant_key, key_key, tenant_quota, key_quota)
  local policies = {evaluate(tenant_key, tenant_quota)}
  if key_quota > 0 then
    policies[2] = evaluate(key_key, key_quota)
  end

  local allowed = true
  for _, policy in ipairs(policies) do
    if not policy.allowed then allowed = false end
  end

  -- The tightest policy: when refused, the one that frees up last; when
  -- allowed, the one with the fewest remaining requests. Ties go to the later
  -- (the key's own, lower) policy.
  local tightest = 1
  for index = 2, #policies do
    local candidate, best = policies[index], policies[tightest]
    if allowed then
      if candidate.remaining <= best.remaining then tightest = index end
    elseif not candidate.allowed then
      if best.allowed or candidate.retry_after_us >= best.retry_after_us then
        tightest = index
      end
    end
  end

  if allowed then
    for _, policy in ipairs(policies) do
      tats[policy.key] = policy.new_tat
      recorded[policy.key] = policy.new_tat
    end
  end

  local chosen = policies[tightest]
  local last = #replies
  replies[last + 1] = allowed and 1 or 0
  replies[last + 2] = tightest
  replies[last + 3] = chosen.quota
  replies[last + 4] = chosen.remaining
  replies[last + 5] = chosen.reset_us
  replies[last + 6] = chosen.retry_after_us
end

for i = 1, count do
  decide(KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]))
end

for key, tat in pairs(recorded) do
  local ttl_ms = math.ceil((tat - now) / 1000)
  redis.call('SET', key, string.format('%.0f', tat),
             'PX', string.format('%.0f', math.max(ttl_ms, 1)))
end

return table.concat(replies, ' ')
