-- adaptive-keepalive: when to keep the function container of a key loaded.
--
-- A hybrid-histogram policy (after Shahrad et al., "Serverless in the
-- Wild", ATC 2020). readCb records the idle time between consecutive
-- invocations of the key in a histogram; from it come two windows, measured
-- from the last invocation:
--   pre-warm (pw): a low percentile of the idle times, less a margin. If it
--                  is long enough, the container is unloaded right after an
--                  invocation and loaded again when pw has passed;
--   keep-alive (ka): a high percentile plus a margin; the container is
--                  unloaded once ka has passed without an invocation.
-- While there are few samples, or most idle times are beyond the histogram,
-- a fixed keep-alive is used instead, unless the few samples already agree
-- (a scheduled function: its idle times repeat); when the idle times are spread too
-- widely to predict, the keep-alive window is capped. timerCb (every minute by default)
-- applies the windows through sys.deploy_container/sys.delete_container.
--
-- Per-key state (JSON-checkpointed by the engine): hist (idle-time bin
-- counts), n, oob, last (µs), warm, pw and ka (minutes), cold (count).

local MINUTE = 60 * 1000000

-- Bins: 1 minute wide below 1 h, 5 minutes below 4 h, 30 minutes below
-- 48 h; longer idle times are out of bounds (oob).
local NBINS = 184
local function bin_of(m)
  if m < 60 then return m + 1 end
  if m < 240 then return 61 + (m - 60) // 5 end
  if m < 2880 then return 97 + (m - 240) // 30 end
  return nil
end
local function bin_low(b)
  if b <= 60 then return b - 1 end
  if b <= 96 then return 60 + (b - 61) * 5 end
  return 240 + (b - 97) * 30
end
local function bin_high(b)
  if b <= 60 then return b end
  if b <= 96 then return 65 + (b - 61) * 5 end
  return 270 + (b - 97) * 30
end

local HEAD, TAIL = 0.05, 0.99     -- percentiles of the idle times
local MARGIN = 0.10               -- widening of both windows
local MIN_PW = 5                  -- minutes; shorter pre-warm windows are not worth an unload
local MIN_SAMPLES = 4             -- fewer: fixed keep-alive...
-- ...unless at least MIN_REGULAR idle times all lie within REGULAR times
-- the shortest of them: a regular pattern is trusted at once, so a
-- function run every few hours or daily is pre-warmed from its fourth run
-- on instead of its sixth.
local MIN_REGULAR, REGULAR = 2, 1.25
local MAX_OOB = 0.5               -- more out-of-bounds idle times than this: fixed keep-alive
local FALLBACK_KA = 60            -- minutes; the fixed keep-alive
-- Idle times spread over more than SPREAD times their low percentile are
-- not predictable enough to pay for a long keep-alive: it is then capped.
local SPREAD, SPREAD_KA = 2, 120
local MAX_SAMPLES = 2000          -- then halve all counts, so old patterns fade

local function windows(st)
  local inb = st.n - st.oob
  if st.n < MIN_REGULAR or st.oob > MAX_OOB * st.n or inb <= 0 then
    return 0, FALLBACK_KA
  end
  local hist = st.hist
  local head_at, tail_at = HEAD * inb, TAIL * inb
  local acc, head, tail = 0, nil, nil
  for b = 1, NBINS do
    acc = acc + hist[b]
    if not head and acc > head_at then head = b end
    if acc >= tail_at then tail = b break end
  end
  local lo, hi = bin_low(head or 1), bin_high(tail or NBINS)
  if st.n < MIN_SAMPLES and (st.oob > 0 or hi > REGULAR * math.max(lo, 1)) then
    return 0, FALLBACK_KA
  end
  local pw = math.floor(lo * (1 - MARGIN))
  if pw < MIN_PW then pw = 0 end
  local ka = math.ceil(hi * (1 + MARGIN)) + 1
  if hi > SPREAD * math.max(lo, 1) and ka > SPREAD_KA then
    ka = SPREAD_KA
  end
  if pw >= ka then pw = 0 end
  return pw, ka
end

local function init(st)
  if st.hist then return end
  local h = {}
  for b = 1, NBINS do h[b] = 0 end
  st.hist, st.n, st.oob, st.cold = h, 0, 0, 0
  st.warm, st.pw, st.ka = false, 0, FALLBACK_KA
end

local function record(st, idle_min)
  if st.n >= MAX_SAMPLES then
    local h, n = st.hist, 0
    for b = 1, NBINS do h[b] = h[b] // 2 n = n + h[b] end
    st.oob = st.oob // 2
    st.n = n + st.oob
  end
  local b = bin_of(idle_min)
  if b then st.hist[b] = st.hist[b] + 1 else st.oob = st.oob + 1 end
  st.n = st.n + 1
  st.pw, st.ka = windows(st)
end

function readCb(caller, args)
  local st = state
  init(st)
  local now = sys.now()
  if st.last then
    -- a clock that stepped back counts as no idle time
    record(st, math.max(now - st.last, 0) // MINUTE)
  end
  st.last = now
  if not st.warm then
    -- a cold start: the runtime starts the container for this invocation
    st.cold = st.cold + 1
    st.warm = true
    sys.deploy_container(sys.key())
  end
  return (sys.read(sys.key()))
end

function timerCb()
  local st = state
  if not st.hist or not st.last then return end
  local since = (sys.now() - st.last) / MINUTE
  if st.warm then
    if (st.pw > 0 and since < st.pw) or since >= st.ka then
      st.warm = false
      sys.delete_container(sys.key())
    end
  elseif st.pw > 0 and since >= st.pw and since < st.ka then
    st.warm = true
    sys.deploy_container(sys.key())
  end
end
