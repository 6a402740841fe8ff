-- Budget mirror of one tenant: a hash {balance, reserved, version} at KEYS[1],
-- and one marker key per applied operation (KEYS[1] .. ":op:" .. id) so that a
-- retried script call is a no-op. Postgres is the truth; this is the
-- cross-replica fast path. A missing hash means "lost": callers rebuild it
-- from Postgres (load) before admitting anything.
--
-- ARGV[1] = command, ARGV[2] = operation marker TTL (seconds), then per command:
--   reserve  id1 amount1 [id2 amount2 ...]  -> {1, available_after, flag1, flag2, ...}
--   release  id1 amount1 [...]              -> {1, available_after}
--   settle   id1 reserved1 charged1 [...]   -> {1, available_after}
--   credit   id amount                      -> {1, available_after}
--   load     balance reserved version       -> {1 if loaded, 0 if it existed}
--   repair   old_balance old_reserved new_balance new_reserved version -> {1|0}
--   read                                    -> {1, balance, reserved, version}
-- A command other than load/read on a missing hash answers {-1}.
-- Amounts arrive as decimal strings of positive integers (checked by the
-- caller; Lua's "-0" quirk makes zero amounts unsafe here).

local key = KEYS[1]
local command = ARGV[1]
local ttl = tonumber(ARGV[2])

local function available()
  return tonumber(redis.call('HGET', key, 'balance')) - tonumber(redis.call('HGET', key, 'reserved'))
end

local function first_time(id)
  return redis.call('SET', key .. ':op:' .. id, '1', 'NX', 'EX', ttl)
end

if command == 'load' then
  if redis.call('EXISTS', key) == 1 then return {0} end
  redis.call('HSET', key, 'balance', ARGV[3], 'reserved', ARGV[4], 'version', ARGV[5])
  return {1}
end

if redis.call('EXISTS', key) == 0 then return {-1} end

if command == 'read' then
  local values = redis.call('HMGET', key, 'balance', 'reserved', 'version')
  return {1, tonumber(values[1]), tonumber(values[2]), tonumber(values[3] or '0')}
elseif command == 'reserve' then
  local result = {1, 0}
  for i = 3, #ARGV, 2 do
    local id, amount = ARGV[i], tonumber(ARGV[i + 1])
    if redis.call('EXISTS', key .. ':op:' .. id) == 1 then
      table.insert(result, 1)
    elseif available() >= amount then
      first_time(id)
      redis.call('HINCRBY', key, 'reserved', amount)
      table.insert(result, 1)
    else
      table.insert(result, 0)
    end
  end
  result[2] = available()
  return result
elseif command == 'release' then
  for i = 3, #ARGV, 2 do
    if first_time(ARGV[i]) then
      redis.call('HINCRBY', key, 'reserved', -tonumber(ARGV[i + 1]))
    end
  end
  return {1, available()}
elseif command == 'settle' then
  for i = 3, #ARGV, 3 do
    if first_time(ARGV[i]) then
      redis.call('HINCRBY', key, 'reserved', -tonumber(ARGV[i + 1]))
      if tonumber(ARGV[i + 2]) > 0 then
        redis.call('HINCRBY', key, 'balance', -tonumber(ARGV[i + 2]))
      end
    end
  end
  return {1, available()}
elseif command == 'credit' then
  if first_time(ARGV[3]) then
    redis.call('HINCRBY', key, 'balance', tonumber(ARGV[4]))
  end
  return {1, available()}
elseif command == 'repair' then
  local values = redis.call('HMGET', key, 'balance', 'reserved')
  if values[1] ~= ARGV[3] or values[2] ~= ARGV[4] then return {0} end
  redis.call('HSET', key, 'balance', ARGV[5], 'reserved', ARGV[6], 'version', ARGV[7])
  return {1}
end
return redis.error_reply('unknown budget command ' .. tostring(command))
