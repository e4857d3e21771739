-- wrk script for the gunicorn workload: GET /notes/<id> over the seeded ids, and one
-- machine-readable summary line, so nothing depends on wrk's human-readable units.
-- Usage: wrk -s wrk_notes.lua http://127.0.0.1:PORT -- FIRST_ID LAST_ID

local first, last = 1, 1

function init(args)
  first = tonumber(args[1]) or 1
  last = tonumber(args[2]) or first
  math.randomseed(os.time())
end

function request()
  return wrk.format("GET", "/notes/" .. math.random(first, last))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %.0f, "duration_us": %.0f, "p50_us": %.0f, "p99_us": %.0f, ' ..
    '"max_us": %.0f, "non2xx": %.0f, "connect": %.0f, "read": %.0f, "write": %.0f, ' ..
    '"timeout": %.0f}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
