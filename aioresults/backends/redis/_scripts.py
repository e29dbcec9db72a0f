"""The Redis backend's Lua scripts: each write is one atomic step on the server."""

from __future__ import annotations

__all__ = ["COUNT_PART", "WRITE", "WRITE_IF", "WRITE_IF_SHARDED", "WRITE_SHARDED"]

# KEYS: the record; ARGV: payload, TTL in ms (0: none).
# Returns 1 written (or already there: a retry of this very write), 0 refused
# (a SUCCESS is stored), -1 undecidable here (a compressed or pickled payload, or
# one cjson/cmsgpack cannot read): Python decides instead, under WATCH.
WRITE = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[1] then return 1 end
  if string.sub(current, 1, 19) == '\\0celery-compressed\\0' then return -1 end
  if string.find(current, 'SUCCESS', 1, true) then
    local first, second = string.byte(current, 1, 2)
    local ok, data
    if first == 123 then
      ok, data = pcall(cjson.decode, current)
    elseif first == 128 and second and second >= 2 and second <= 5 then
      return -1
    elseif (first >= 128 and first <= 143) or first == 222 or first == 223 then
      ok, data = pcall(cmsgpack.unpack, current)
    else
      return -1
    end
    if not ok or type(data) ~= 'table' then return -1 end
    if data['status'] == 'SUCCESS' then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
#: On a cluster the write publishes on the key's own shard.
WRITE_SHARDED = WRITE.replace("'PUBLISH'", "'SPUBLISH'")

# KEYS: the record; ARGV: payload, TTL in ms (0: none), SHA1 of the record the
# caller read and judged ('' for none). The guard for payloads the script above
# cannot read: Python decides on what it read, and this writes only if that is
# still what is stored (else 2: read and decide again). 1 written (or exactly
# this payload is there already).
WRITE_IF = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[1] then return 1 end
  if redis.sha1hex(current) ~= ARGV[3] then return 2 end
elseif ARGV[3] ~= '' then
  return 2
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
WRITE_IF_SHARDED = WRITE_IF.replace("'PUBLISH'", "'SPUBLISH'")

# KEYS: size, parts, counter, receipts; ARGV: part, payload, TTL in ms, receipt.
# Returns {count, size, own} or nil (no chord). A part counts once; its receipt
# ("<count>:<receipt>") tells a retry of the call that counted it (own = 1) from
# a redelivery (own = 0), and gives either its count back. The count never
# passes the size: a new part beyond it gets size + 1 and is not stored.
COUNT_PART = """
local size = redis.call('GET', KEYS[1])
if not size then return false end
size = tonumber(size)
local receipt = redis.call('HGET', KEYS[4], ARGV[1])
if receipt then
  local sep = string.find(receipt, ':', 1, true)
  local own = 0
  if sep and string.sub(receipt, sep + 1) == ARGV[4] then own = 1 end
  return {tonumber(string.sub(receipt, 1, (sep or 1) - 1)) or 0, size, own}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {0, size, 0} end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= size then return {size + 1, size, 0} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local count = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], ARGV[1], count .. ':' .. ARGV[4])
if tonumber(ARGV[3]) > 0 then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return {count, size, 1}
"""
