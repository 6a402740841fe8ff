-- Budget mirror of one tenant: a hash {balance, reserved, version} at KEYS[1],
-- one marker key per applied operation (KEYS[1] .. ":op:" .. id) so that a
-- retried script call is a no-op, and a hash of *pending holds* at
-- KEYS[1] .. ":pending" (hold id -> "amount:placed_at_ms"): holds placed here
-- whose Postgres commit has not been reported back yet. Postgres is the truth;
-- this is the cross-replica fast path. A missing hash means "lost": callers
-- rebuild it from Postgres (load) before admitting anything.
--
-- ``version`` is the Postgres ledger_version the values were last loaded or
-- repaired from (the *baseline*): every commit at or below it is already in
-- the values, so a settle or credit carrying such a version is skipped. That
-- is what keeps a repair that raced an in-flight application from counting
-- the application twice (docs/money.md, "The mirror").
--
-- ARGV[1] = command, ARGV[2] = operation marker TTL (seconds), then per command:
--   reserve  n_resolved resolved1..resolved_n id1 amount1 [id2 amount2 ...]
--                                           -> {1, available_after, flag1, flag2, ...}
--            resolved: holds an earlier call placed that Postgres has since
--            committed (no longer pending; the budget actor reports them with
--            its next call instead of a call of their own)
--   resolve  n_kept kept1..kept_n [id1 amount1 ...] -> {1, available_after}
--            kept: holds Postgres committed (no longer pending); the pairs:
--            holds Postgres refused, given back only if still pending
--   settle   version id1 reserved1 charged1 [...] -> {1, available_after, applied 0|1}
--   credit   version id amount              -> {1, available_after, applied 0|1}
--   load     balance reserved version       -> {1 if loaded, 0 if it existed}
--   repair   old_balance old_reserved new_balance new_reserved version [dropped ids...] -> {1|0}
--   read                                    -> {1, balance, reserved, version}
--   observe                                 -> {1, balance, reserved, version, now_ms,
--                                                id1, amount1, placed_ms1, ...}
-- A command other than load/read/observe on a missing hash answers {-1}.
-- Amounts arrive as decimal strings of positive integers (checked by the
-- caller; Lua's "-0" quirk makes zero amounts unsafe here).

local key = KEYS[1]
local pending = key .. ':pending'
local command = ARGV[1]
local ttl = tonumber(ARGV[2])

local function available()
  return tonumber(redis.call('HGET', key, 'balance')) - tonumber(redis.call('HGET', key, 'reserved'))
end

local function first_time(id)
  return redis.call('SET', key .. ':op:' .. id, '1', 'NX', 'EX', ttl)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function baseline()
  return tonumber(redis.call('HGET', key, 'version') or '0')
end

if command == 'load' then
  if redis.call('EXISTS', key) == 1 then return {0} end
  -- holds pending on a lost mirror were lost with it: the rebuild starts clean
  redis.call('DEL', pending)
  redis.call('HSET', key, 'balance', ARGV[3], 'reserved', ARGV[4], 'version', ARGV[5])
  return {1}
end

if redis.call('EXISTS', key) == 0 then return {-1} end

if command == 'read' then
  local values = redis.call('HMGET', key, 'balance', 'reserved', 'version')
  return {1, tonumber(values[1]), tonumber(values[2]), tonumber(values[3] or '0')}
elseif command == 'observe' then
  local values = redis.call('HMGET', key, 'balance', 'reserved', 'version')
  local result = {1, tonumber(values[1]), tonumber(values[2]), tonumber(values[3] or '0'), now_ms()}
  local holds = redis.call('HGETALL', pending)
  for i = 1, #holds, 2 do
    local amount, placed = string.match(holds[i + 1], '^(%d+):(%d+)$')
    table.insert(result, holds[i])
    table.insert(result, tonumber(amount))
    table.insert(result, tonumber(placed))
  end
  return result
elseif command == 'reserve' then
  local resolved = tonumber(ARGV[3])
  for i = 4, 3 + resolved do
    redis.call('HDEL', pending, ARGV[i])
  end
  local result = {1, 0}
  local placed = now_ms()
  for i = 4 + resolved, #ARGV, 2 do
    local id, amount = ARGV[i], tonumber(ARGV[i + 1])
    if redis.call('EXISTS', key .. ':op:' .. id) == 1 then
      table.insert(result, 1)
    elseif available() >= amount then
      first_time(id)
      redis.call('HINCRBY', key, 'reserved', amount)
      redis.call('HSET', pending, id, ARGV[i + 1] .. ':' .. placed)
      table.insert(result, 1)
    else
      table.insert(result, 0)
    end
  end
  result[2] = available()
  return result
elseif command == 'resolve' then
  local kept = tonumber(ARGV[3])
  for i = 4, 3 + kept do
    redis.call('HDEL', pending, ARGV[i])
  end
  for i = 4 + kept, #ARGV, 2 do
    -- only a hold still pending is given back: one dropped by a repair or lost
    -- with a rebuilt mirror is not in ``reserved`` any more
    if redis.call('HDEL', pending, ARGV[i]) == 1 then
      redis.call('HINCRBY', key, 'reserved', -tonumber(ARGV[i + 1]))
    end
  end
  return {1, available()}
elseif command == 'settle' then
  if tonumber(ARGV[3]) <= baseline() then return {1, available(), 0} end
  for i = 4, #ARGV, 3 do
    if first_time(ARGV[i]) then
      redis.call('HINCRBY', key, 'reserved', -tonumber(ARGV[i + 1]))
      if tonumber(ARGV[i + 2]) > 0 then
        redis.call('HINCRBY', key, 'balance', -tonumber(ARGV[i + 2]))
      end
    end
  end
  return {1, available(), 1}
elseif command == 'credit' then
  if tonumber(ARGV[3]) <= baseline() then return {1, available(), 0} end
  if first_time(ARGV[4]) then
    redis.call('HINCRBY', key, 'balance', tonumber(ARGV[5]))
  end
  return {1, available(), 1}
elseif command == 'repair' then
  local values = redis.call('HMGET', key, 'balance', 'reserved')
  if values[1] ~= ARGV[3] or values[2] ~= ARGV[4] then return {0} end
  redis.call('HSET', key, 'balance', ARGV[5], 'reserved', ARGV[6], 'version', ARGV[7])
  for i = 8, #ARGV do
    redis.call('HDEL', pending, ARGV[i])
  end
  return {1}
end
return redis.error_reply('unknown budget command ' .. tostring(command))
