package org.servemodels.oip;

import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest.BodyPublishers;
import java.net.http.HttpResponse.BodyHandlers;
import java.security.SecureRandom;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The frontend's span of each request on the inference port, in the trace its W3C traceparent names (a new trace
 * when it names none, or one that does not parse), exported over OTLP/HTTP in its JSON form to the collector the
 * environment names (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT with /v1/traces), as the
 * workers' spans are (handlers/tracing.py); installed only when one is named. The span lasts from the request's
 * head to its answer's head. The request's traceparent is replaced by one naming this span, so the worker's spans
 * are its children. A client that does not sample is passed on untouched and nothing is recorded. Spans leave
 * from one daemon thread in batches; a full queue drops spans (counted), never delays a request. A post that fails
 * to connect or is answered 429, 502, 503 or 504 is tried again (OTLP's retryable answers), at most twice, after
 * 200 and 400 ms; then, or on any other answer but a 2xx, its spans are dropped (counted).
 */
public final class RequestTraces extends PerAnswer<RequestTraces.Span> {

    public static final String HEADER = "traceparent";
    private static final SecureRandom RANDOM = new SecureRandom();
    private static final Exporter EXPORTER = Exporter.fromEnvironment();

    /** Whether the environment names a collector (ServerInitializer installs this handler only then). */
    public static boolean enabled() {
        return EXPORTER != null;
    }

    /** One request's span while it is open; null fields of an unsampled request. */
    static final class Span {
        String traceId;
        String spanId;
        String parentId;
        String name;
        String requestId;
        long startNanos;
        boolean sampled;
    }

    static String hex(int bytes) {
        byte[] value = new byte[bytes];
        do {
            RANDOM.nextBytes(value);
        } while (allZero(value));
        StringBuilder out = new StringBuilder(bytes * 2);
        for (byte b : value) {
            out.append(Character.forDigit((b >> 4) & 0xf, 16)).append(Character.forDigit(b & 0xf, 16));
        }
        return out.toString();
    }

    private static boolean allZero(byte[] value) {
        for (byte b : value) {
            if (b != 0) {
                return false;
            }
        }
        return true;
    }

    private static boolean lowerHex(String text, int length) {
        if (text.length() != length) {
            return false;
        }
        boolean nonZero = false;
        for (int i = 0; i < length; i++) {
            char c = text.charAt(i);
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
                return false;
            }
            nonZero |= c != '0';
        }
        return nonZero;
    }

    static long nowNanos() {
        Instant now = Instant.now();
        return now.getEpochSecond() * 1_000_000_000L + now.getNano();
    }

    @Override
    Span read(HttpRequest request) {
        Span span = new Span();
        span.startNanos = nowNanos();
        String offered = request.headers().get(HEADER);
        String[] parts = offered == null ? new String[0] : offered.trim().split("-", -1);
        if (parts.length == 4 && "00".equals(parts[0]) && lowerHex(parts[1], 32) && lowerHex(parts[2], 16)
                && parts[3].matches("[0-9a-f]{2}")) {
            span.traceId = parts[1];
            span.parentId = parts[2];
            span.sampled = (Integer.parseInt(parts[3], 16) & 1) == 1;
        } else {
            span.traceId = hex(16);
            span.parentId = "";
            span.sampled = true;
        }
        if (span.sampled) {
            span.spanId = hex(8);
            String path = request.uri();
            int query = path.indexOf('?');
            span.name = request.method().name() + " " + (query < 0 ? path : path.substring(0, query));
            span.requestId = request.headers().get(RequestIds.HEADER);
            request.headers().set(HEADER, "00-" + span.traceId + "-" + span.spanId + "-01");
        }
        return span;
    }

    @Override
    void answered(HttpResponse response, Span span) {
        if (span.sampled) {
            EXPORTER.add(span, response.status().code(), nowNanos());
        }
    }

    /** Spans queued for one daemon thread that posts them in batches. */
    static final class Exporter implements Runnable {
        private static final int QUEUE = 4096;
        private static final int BATCH = 512;
        private final URI endpoint;
        private final String service;
        private final long delayMillis;
        private final BlockingQueue<String> queue = new ArrayBlockingQueue<>(QUEUE);
        private final AtomicLong dropped = new AtomicLong();
        private static final int TRIES = 3;
        private static final long RETRY_MILLIS = 200;
        private final HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(5)).build();

        private Exporter(URI endpoint, String service, long delayMillis) {
            this.endpoint = endpoint;
            this.service = service;
            this.delayMillis = delayMillis;
        }

        static Exporter fromEnvironment() {
            String traces = System.getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
            String base = System.getenv("OTEL_EXPORTER_OTLP_ENDPOINT");
            String url;
            if (traces != null && !traces.isEmpty()) {
                url = traces;
            } else if (base != null && !base.isEmpty()) {
                url = (base.endsWith("/") ? base.substring(0, base.length() - 1) : base) + "/v1/traces";
            } else {
                return null;
            }
            String service = System.getenv("OTEL_SERVICE_NAME");
            long delay = 5000;
            try {
                String value = System.getenv("OTEL_BSP_SCHEDULE_DELAY");
                if (value != null && !value.isEmpty()) {
                    delay = Math.max(10, Long.parseLong(value.trim()));
                }
            } catch (NumberFormatException e) {
                // the SDK's default, as the workers' SDK does with a value it cannot read
            }
            Exporter exporter = new Exporter(URI.create(url),
                    service == null || service.isEmpty() ? "torchserve-frontend" : service, delay);
            Thread thread = new Thread(exporter, "otlp-span-exporter");
            thread.setDaemon(true);
            thread.start();
            return exporter;
        }

        void add(Span span, int status, long endNanos) {
            StringBuilder json = new StringBuilder(384);
            json.append("{\"traceId\":\"").append(span.traceId).append("\",\"spanId\":\"").append(span.spanId)
                    .append("\",\"parentSpanId\":\"").append(span.parentId).append("\",\"name\":\"")
                    .append(escaped(span.name)).append("\",\"kind\":2,\"startTimeUnixNano\":\"")
                    .append(span.startNanos).append("\",\"endTimeUnixNano\":\"").append(endNanos)
                    .append("\",\"attributes\":[{\"key\":\"http.response.status_code\",\"value\":{\"intValue\":\"")
                    .append(status).append("\"}}");
            if (span.requestId != null) {
                json.append(",{\"key\":\"request.id\",\"value\":{\"stringValue\":\"")
                        .append(escaped(span.requestId)).append("\"}}");
            }
            json.append("],\"status\":{\"code\":").append(status >= 500 ? 2 : 0).append("}}");
            if (!queue.offer(json.toString())) {
                dropped.incrementAndGet();
            }
        }

        static String escaped(String text) {
            StringBuilder out = new StringBuilder(text.length());
            for (int i = 0; i < text.length(); i++) {
                char c = text.charAt(i);
                if (c == '"' || c == '\\') {
                    out.append('\\').append(c);
                } else if (c < 0x20 || c > 0x7e) {
                    out.append(String.format("\\u%04x", (int) c));
                } else {
                    out.append(c);
                }
            }
            return out.toString();
        }

        @Override
        public void run() {
            List<String> batch = new ArrayList<>(BATCH);
            while (true) {
                try {
                    String first = queue.poll(delayMillis, TimeUnit.MILLISECONDS);
                    if (first == null) {
                        continue;
                    }
                    batch.add(first);
                    queue.drainTo(batch, BATCH - 1);
                    post(batch);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    return;
                } catch (RuntimeException e) {
                    dropped.addAndGet(batch.size()); // a collector that is down or refuses costs these spans
                } finally {
                    batch.clear();
                }
            }
        }

        private void post(List<String> spans) throws InterruptedException {
            StringBuilder body = new StringBuilder(64 + spans.size() * 384);
            body.append("{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\",\"value\":")
                    .append("{\"stringValue\":\"").append(escaped(service)).append("\"}}]},\"scopeSpans\":[{")
                    .append("\"scope\":{\"name\":\"servemodels.frontend\"},\"spans\":[")
                    .append(String.join(",", spans)).append("]}]}]}");
            java.net.http.HttpRequest request = java.net.http.HttpRequest.newBuilder(endpoint)
                    .timeout(Duration.ofSeconds(10)).header("Content-Type", "application/json")
                    .POST(BodyPublishers.ofString(body.toString())).build();
            for (int attempt = 1; attempt <= TRIES; attempt++) {
                int status;
                try {
                    status = client.send(request, BodyHandlers.discarding()).statusCode();
                } catch (java.io.IOException e) {
                    status = -1; // no answer: the collector is down, or the connection failed
                }
                if (status >= 200 && status < 300) {
                    return;
                }
                boolean retryable = status == -1 || status == 429 || status == 502 || status == 503 || status == 504;
                if (!retryable || attempt == TRIES) {
                    break;
                }
                Thread.sleep(RETRY_MILLIS * attempt);
            }
            dropped.addAndGet(spans.size());
        }
    }
}
