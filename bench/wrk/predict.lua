-- POST one request body to /predict. The body comes from the environment so one script serves every
-- pipeline:  WRK_BODY='{"inputs": [[5.1, 3.5, 1.4, 0.2]]}' wrk -s bench/wrk/predict.lua URL
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("WRK_BODY") or '{"inputs": [[5.1, 3.5, 1.4, 0.2]]}'
-- An API key, where /predict wants one (FLYWHEEL_API_KEYS).
if os.getenv("WRK_API_KEY") and os.getenv("WRK_API_KEY") ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_API_KEY")
end

done = function(summary, latency, requests)
   -- One line a program can read. errors.status counts answers that were not 2xx or 3xx.
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
      '"write_errors": %d, "timeouts": %d, "non_2xx": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
      summary.errors.timeout, summary.errors.status, latency:percentile(50), latency:percentile(99), latency.max))
end
