-- smart-replication: as many copies of a key as its popularity needs.
--
-- createCb copies the new data to the BASE - 1 closest leaf-set members
-- (with the root that makes BASE replicas). readCb counts reads. timerCb
-- turns the count into a smoothed read rate per timer interval and asks for
-- one more replica per doubling of the rate above HOT (at most MAX):
-- raising at once, lowering one replica per interval, so a short lull does
-- not shed copies that are needed again a minute later.

local BASE, MAX = 3, 8
local HOT = 60          -- reads per interval that justify a fourth replica
local SMOOTH = 0.5      -- weight of the newest interval in the rate

function createCb(caller, data)
  local key = sys.key()
  for _, node in ipairs(sys.leaf_set(BASE - 1)) do
    sys.write(node, key, data)
  end
  state.replicas, state.reads, state.rate = BASE, 0, 0
  return data
end

function readCb(caller, args)
  state.reads = (state.reads or 0) + 1
  return (sys.read(sys.key()))
end

function timerCb()
  local rate = (1 - SMOOTH) * (state.rate or 0) + SMOOTH * (state.reads or 0)
  state.rate, state.reads = rate, 0
  local want, r = BASE, rate
  while r >= HOT and want < MAX do
    want, r = want + 1, r / 2
  end
  local cur = state.replicas or BASE
  if want < cur then want = cur - 1 end
  if want ~= cur then
    state.replicas = want
    sys.set_replicas(sys.key(), want)
  end
end
