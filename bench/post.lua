-- wrk script: POST the bench's /v1/messages request with a proxy key.
-- BENCH_BODY names the request body file; BENCH_KEY is the proxy key (x-api-key).
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = os.getenv("BENCH_KEY") or "bench"
