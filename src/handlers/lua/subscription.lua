-- subscription: readers can subscribe to a key and get every update pushed.
--
-- readCb(caller, {subscribe = true}) registers the caller with the key's
-- multicast tree (sys.subscribe; the tree itself is the runtime's) and
-- returns the current value; {unsubscribe = true} leaves it. updateCb
-- publishes every new value through sys.publish as {seq = n, value = v}.
-- seq grows by at least one per update and never falls below the root's
-- clock in microseconds, so it keeps growing when a new root takes over
-- from a checkpoint. timerCb only exists so that seq and the subscriber
-- count are checkpointed.

function readCb(caller, args)
  local key = sys.key()
  if type(args) == "table" and caller ~= "" then
    if args.subscribe then
      state.subscribers = (state.subscribers or 0) + 1
      sys.subscribe(key, caller)
    elseif args.unsubscribe then
      state.subscribers = math.max((state.subscribers or 0) - 1, 0)
      sys.unsubscribe(key, caller)
    end
  end
  return (sys.read(key))
end

function updateCb(caller, new_data)
  local seq = math.max((state.seq or 0) + 1, sys.now())
  state.seq = seq
  sys.publish(sys.key(), { seq = seq, value = new_data })
  return new_data
end

function timerCb()
end
