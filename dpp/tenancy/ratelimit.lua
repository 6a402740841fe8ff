-- Rate limit check for one request: GCRA (generic cell rate algorithm) over up
-- to two policies of one tenant, decided and recorded in one atomic call.
-- See docs/rate-limits.md for why GCRA and how the numbers are derived.
--
-- KEYS[1] = the tenant policy's TAT key  <prefix>:ratelimit:{tenant_id}
-- KEYS[2] = the key policy's TAT key     <prefix>:ratelimit:{tenant_id}:key:<key_id>
--           (always passed, so both keys share the {tenant_id} hash slot;
--            untouched when ARGV[2] is 0)
-- ARGV[1] = tenant quota: requests per window (>= 1)
-- ARGV[2] = key quota (>= 1), or 0 when the key has no lower limit of its own
-- ARGV[3] = window in microseconds (60000000)
--
-- A policy of quota q has emission interval T = ceil(window / q) microseconds
-- (integers throughout, so every comparison is exact) and burst capacity
-- q * T. Its state is the theoretical arrival time (TAT), microseconds since
-- the epoch. A request is allowed when TAT + T - q * T <= now for EVERY
-- policy; only then are the new TATs written, so a refused request costs
-- nothing. Time is Redis's own clock (TIME), the same for every replica.
--
-- Returns {allowed (1|0), tightest (1 tenant | 2 key), quota, remaining,
--          reset_us, retry_after_us (0 when allowed)}.

local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local window = tonumber(ARGV[3])

local function evaluate(key, quota)
  local interval = math.ceil(window / quota)
  local capacity = interval * quota
  local stored = redis.call('GET', key)
  local tat = now
  if stored then
    tat = math.max(tonumber(stored), now)
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

local policies = {evaluate(KEYS[1], tonumber(ARGV[1]))}
local key_quota = tonumber(ARGV[2])
if key_quota > 0 then
  policies[2] = evaluate(KEYS[2], key_quota)
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
    local ttl_ms = math.ceil((policy.new_tat - now) / 1000)
    redis.call('SET', policy.key, string.format('%.0f', policy.new_tat),
               'PX', string.format('%.0f', math.max(ttl_ms, 1)))
  end
end

local chosen = policies[tightest]
return {allowed and 1 or 0, tightest, chosen.quota, chosen.remaining, chosen.reset_us,
        chosen.retry_after_us}
