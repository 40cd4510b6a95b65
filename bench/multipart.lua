-- wrk script: POST one image (path in $BENCH_IMAGE) to /v1/captions as multipart/form-data, and
-- print a JSON summary (bench/http_load.py reads the last line).
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local image = f:read("*a")
f:close()
local boundary = "----captionerbench7d1f"
wrk.method = "POST"
wrk.path = "/v1/captions"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. "Content-Disposition: form-data; name=\"image\"; filename=\"image.jpg\"\r\n"
  .. "Content-Type: image/jpeg\r\n\r\n" .. image .. "\r\n--" .. boundary .. "--\r\n"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"loadgen": "wrk", "requests": %d, "seconds": %.3f, "requests_per_s": %.2f, "ok": %d, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
    .. '"latency_ms": {"p50": %.1f, "p90": %.1f, "p95": %.1f, "p99": %.1f}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    summary.requests - e.status - e.timeout - e.read, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end
