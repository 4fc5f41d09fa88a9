-- Sandbox prelude: runs once per app state, before any handler code, while
-- the state still has the raw base functions and `coroutine`. What handlers
-- must not reach stays in locals of this chunk: Lua code cannot read another
-- function's upvalues without the `debug` library, which is never loaded.
local rt = ...
local raw_pcall, raw_error, raw_load = pcall, error, load
local raw_setmetatable, raw_collect = setmetatable, collectgarbage
local rawget, type, select, string_byte = rawget, type, select, string.byte
local yield = coroutine.yield
local aborting = rt.aborting

-- The token sys.read yields with; the engine answers only this.
local READ = {}

-- pcall and xpcall catch a handler's own errors but never a budget, memory
-- or scope abort: those end the whole call.
local function pass(ok, ...)
  if not ok and aborting((...)) then
    raw_error((...), 0)
  end
  return ok, ...
end
function pcall(f, ...)
  return pass(raw_pcall(f, ...))
end
-- The message handler runs after the stack unwinds, not as a Lua message
-- handler: Lua calls those with hooks off when the error came from a hook,
-- and no budget could stop one.
local function handled(h, ok, ...)
  if ok then
    return true, ...
  end
  local e = ...
  if aborting(e) then
    raw_error(e, 0)
  end
  return false, h(e)
end
function xpcall(f, h, ...)
  return handled(h, raw_pcall(f, ...))
end

-- Finalizers run with debug hooks off, so no budget could stop one.
function setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    raw_error("setmetatable: __gc metamethods are not allowed in handlers", 2)
  end
  return raw_setmetatable(t, mt)
end

function collectgarbage(opt)
  if opt == "count" then
    return raw_collect("count")
  end
  raw_error('collectgarbage: only "count" is allowed in handlers', 2)
end

-- Text chunks only: crafted bytecode can break the VM's invariants.
function load(chunk, name, mode, ...)
  if mode ~= nil and mode ~= "t" then
    raw_error("load: only text chunks are allowed in handlers", 2)
  end
  if type(chunk) == "string" and string_byte(chunk, 1) == 27 then
    raw_error("load: binary chunks are not allowed in handlers", 2)
  end
  if select("#", ...) > 0 then
    return raw_load(chunk, name, "t", (...))
  end
  return raw_load(chunk, name, "t")
end

dofile, loadfile, warn = nil, nil, nil
print = rt.log
string.dump = nil
string.rep = rt.rep

local sys = {}
for k, v in next, rt.sys do
  sys[k] = v
end
local read_local = rt.read_local
-- Own key: answered from the call's context. Other keys: the call yields to
-- the engine, which awaits the host and resumes it with the answer.
function sys.read(key)
  local here, a, b = read_local(key)
  if here then
    return a, b
  end
  return yield(READ, a)
end
sys.null = rt.null
_G.sys = sys

-- Every call runs as run(callback, args...) in a fresh coroutine. Errors are
-- turned into values here, inside the budgeted coroutine, so that no
-- __tostring of a handler's error object ever runs outside the budget.
local function finish(ok, ...)
  if ok then
    return true, ...
  end
  local e = ...
  local t = type(e)
  if t ~= "string" and t ~= "userdata" then
    e = "error object is a " .. t .. " value"
  end
  return false, e
end
local function run(f, ...)
  return finish(raw_pcall(f, ...))
end

return run, READ
