-- The balancer's span of each request it proxies, in the W3C trace the request's traceparent names (a new trace
-- when it names none, or one that does not parse; nothing when the client does not sample it), exported over
-- OTLP/HTTP in OTLP's JSON form. HAProxy 2.6 as Debian builds it has Lua but no OpenTelemetry tracer to plug into
-- its OpenTracing filter, so this is the balancer's own, loaded by haproxy.cfg only when the environment names a
-- collector (serve_config/fleet/balancer.py: OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
--
--   trace_start (http-request, after the request's ID is set): reads traceparent, opens the span and passes the
--                request on with a traceparent naming it, so the replica's frontend span is its child;
--   trace_end   (http-response, a replica's answer head): closes the span with the status and the replica's name
--                and queues it; trace_refused <status>, just before the balancer answers a request itself (its
--                401 and 413), closes it with that status;
--   a task posts the queued spans every OTEL_BSP_SCHEDULE_DELAY ms (5000 by default, as OpenTelemetry's SDKs).
--
-- The queue is bounded (MAX_QUEUED): past it, spans are dropped, never requests. An error HAProxy answers while
-- connecting (a 503 without a ready replica, a 504) has no span: 2.6 runs no Lua in http-after-response; its log
-- line names the request's ID.

local MAX_QUEUED = 4096
local MAX_BATCH = 512

local function endpoint()
    local traces = os.getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces ~= nil and traces ~= "" then
        return traces
    end
    local base = os.getenv("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    return base ~= "" and (base:gsub("/+$", "") .. "/v1/traces") or nil
end

local ENDPOINT = endpoint()
local SERVICE = os.getenv("OTEL_SERVICE_NAME")
if SERVICE == nil or SERVICE == "" then
    SERVICE = "haproxy"
end
local DELAY_MS = math.tointeger(tonumber(os.getenv("OTEL_BSP_SCHEDULE_DELAY") or "")) or 5000
if DELAY_MS < 1 then
    DELAY_MS = 5000
end

local queue = {}
local dropped = 0
-- seeded from the kernel once, at load (a blocking read is allowed then), so that balancers started in the same
-- second do not make the same IDs
local function seed()
    local urandom = io.open("/dev/urandom", "rb")
    if urandom == nil then
        return os.time() + math.floor(os.clock() * 1000000)
    end
    local bytes = urandom:read(6)
    urandom:close()
    local value = 0
    for i = 1, #bytes do
        value = value * 256 + bytes:byte(i)
    end
    return value
end
math.randomseed(seed())

local function hex(bytes)
    local out = {}
    for i = 1, bytes do
        out[i] = string.format("%02x", math.random(0, 255))
    end
    local text = table.concat(out)
    if text:match("^0+$") then -- an all-zero ID is invalid
        return hex(bytes)
    end
    return text
end

local function now_ns()
    local now = core.now()
    return now.sec * 1000000000 + now.usec * 1000
end

-- A string as a JSON string's contents: quotes, backslashes and anything outside printable ASCII escaped.
local function escaped(text)
    return (text:gsub('[%c"\\\128-\255]', function(c)
        return string.format("\\u%04x", c:byte())
    end))
end

-- The client's (trace ID, parent span ID, sampled) from a traceparent header, or nil when it does not parse.
local function parse(header)
    if header == nil then
        return nil
    end
    local version, trace, parent, flags = header:match("^%s*(%x%x)%-(%x+)%-(%x+)%-(%x%x)%s*$")
    if version ~= "00" or #trace ~= 32 or #parent ~= 16 or trace:match("[A-F]") or parent:match("[A-F]")
            or trace:match("^0+$") or parent:match("^0+$") then
        return nil
    end
    return trace, parent, (tonumber(flags, 16) & 1) == 1
end

core.register_action("trace_start", {"http-req"}, function(txn)
    if ENDPOINT == nil then
        return
    end
    local headers = txn.http:req_get_headers()
    local offered = headers["traceparent"] and headers["traceparent"][0]
    local trace, parent, sampled = parse(offered)
    if trace == nil then
        trace, parent, sampled = hex(16), "", true
    end
    if not sampled then
        return -- passed on as it came: nobody records this request
    end
    local span = hex(8)
    txn.http:req_set_header("traceparent", "00-" .. trace .. "-" .. span .. "-01")
    txn:set_var("txn.trace_span", table.concat({trace, span, parent, tostring(now_ns())}, " "))
    txn:set_var("txn.trace_name", txn.sf:method() .. " " .. txn.sf:path())
end, 0)

-- Closes the request's span, if it has one, with `status`, and queues it.
local function finish(txn, status, server)
    local opened = txn:get_var("txn.trace_span")
    if opened == nil then
        return
    end
    txn:unset_var("txn.trace_span")
    local trace, span, parent, start = opened:match("^(%x+) (%x+) (%x*) (%d+)$")
    local attributes = {'{"key":"http.response.status_code","value":{"intValue":"' .. status .. '"}}'}
    if server ~= nil then
        attributes[#attributes + 1] = '{"key":"haproxy.server","value":{"stringValue":"' .. escaped(server) .. '"}}'
    end
    local request_id = txn:get_var("txn.request_id")
    if request_id ~= nil then
        attributes[#attributes + 1] = '{"key":"request.id","value":{"stringValue":"' .. escaped(request_id) .. '"}}'
    end
    if #queue >= MAX_QUEUED then
        dropped = dropped + 1
        return
    end
    queue[#queue + 1] = '{"traceId":"' .. trace .. '","spanId":"' .. span .. '","parentSpanId":"' .. parent
        .. '","name":"' .. escaped(txn:get_var("txn.trace_name") or "") .. '","kind":2,"startTimeUnixNano":"'
        .. start .. '","endTimeUnixNano":"' .. tostring(now_ns()) .. '","attributes":['
        .. table.concat(attributes, ",") .. '],"status":{"code":' .. (status >= 500 and 2 or 0) .. '}}'
end

core.register_action("trace_end", {"http-res"}, function(txn)
    finish(txn, tonumber(txn.sf:status()) or 0, txn.sf:srv_name() or "")
end, 0)

-- Just before the balancer answers a request itself (`http-request return`): the span ends with that status.
core.register_action("trace_refused", {"http-req"}, function(txn, status)
    finish(txn, tonumber(status) or 0, nil)
end, 1)

local function post(spans)
    local body = '{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":'
        .. '{"stringValue":"' .. escaped(SERVICE) .. '"}}]},"scopeSpans":[{"scope":{"name":'
        .. '"servemodels.haproxy"},"spans":[' .. table.concat(spans, ",") .. ']}]}]}'
    local ok, answer = pcall(function()
        return core.httpclient():post({url = ENDPOINT, body = body, timeout = 10000,
                                       headers = {["content-type"] = {"application/json"},
                                                  ["content-length"] = {tostring(#body)}}})
    end)
    if not ok or answer == nil or answer.status == nil or answer.status >= 300 then
        dropped = dropped + #spans -- a collector that is down or refuses costs these spans
    end
end

if ENDPOINT ~= nil then
    core.register_task(function()
        while true do
            core.msleep(DELAY_MS)
            local taken = queue
            queue = {}
            for first = 1, #taken, MAX_BATCH do
                post(table.move(taken, first, math.min(first + MAX_BATCH - 1, #taken), 1, {}))
            end
        end
    end)
end
