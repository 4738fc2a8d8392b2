package dev.meterflow.format;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Fetches writer schemas by id from a Confluent-compatible schema registry ({@code GET
 * {url}/schemas/ids/{id}}), with a bounded wait: a few tries within about two seconds, then a
 * reason, never an exception and never an unbounded block of the task.
 *
 * <p>After a failed attempt the registry counts as down for {@link #COOL_DOWN}: lookups in that time
 * fail at once with the same reason instead of stalling the task two seconds per message (those
 * messages become dead letters, to be replayed when the registry is back).
 */
final class SchemaRegistryClient {

    static final int TRIES = 3;
    static final Duration CONNECT_TIMEOUT = Duration.ofMillis(500);
    /** Per try, the whole exchange, body included. */
    static final Duration TRY_TIMEOUT = Duration.ofMillis(500);
    /** Waits before the second and the third try: 3 tries end within about 2 s. */
    static final long[] BACKOFF_MS = {200, 400};
    static final Duration COOL_DOWN = Duration.ofSeconds(5);
    /** A schema is a few KB; a larger answer is not a schema registry's. */
    static final int MAX_RESPONSE_BYTES = 1 << 20;

    private static final ObjectMapper JSON = new ObjectMapper();

    /** A writer schema, or why there is none: {@code retryable} when a later replay may succeed. */
    record Lookup(Schema schema, String reason, boolean retryable) { }

    private final String baseUrl;
    private final Duration tryTimeout;
    private HttpClient http;
    private long downUntilNanos;
    private String downCause;

    SchemaRegistryClient(String url) {
        this(url, TRY_TIMEOUT);
    }

    /** @param tryTimeout per try; tests on a busy machine wait longer than {@link #TRY_TIMEOUT} */
    SchemaRegistryClient(String url, Duration tryTimeout) {
        this.baseUrl = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
        this.tryTimeout = tryTimeout;
    }

    Lookup fetch(long id) {
        if (downCause != null && System.nanoTime() - downUntilNanos < 0) {
            return unreachable(id, downCause);
        }
        if (http == null) {
            http = HttpClient.newBuilder().connectTimeout(CONNECT_TIMEOUT).followRedirects(HttpClient.Redirect.NORMAL).build();
        }
        HttpRequest request = HttpRequest.newBuilder(URI.create(baseUrl + "/schemas/ids/" + id))
                .timeout(tryTimeout)
                .header("Accept", "application/vnd.schemaregistry.v1+json, application/json")
                .GET()
                .build();
        String cause = null;
        for (int attempt = 0; attempt < TRIES; attempt++) {
            if (attempt > 0 && !sleep(BACKOFF_MS[attempt - 1])) {
                cause = "interrupted";
                break;
            }
            HttpResponse<byte[]> response;
            CompletableFuture<HttpResponse<byte[]>> pending = http.sendAsync(request, SchemaRegistryClient::boundedBody);
            try {
                response = pending.get(tryTimeout.toMillis(), TimeUnit.MILLISECONDS);
            } catch (TimeoutException e) {
                pending.cancel(true);
                cause = "no answer within " + tryTimeout.toMillis() + " ms";
                continue;
            } catch (ExecutionException e) {
                Throwable c = e.getCause() == null ? e : e.getCause();
                // The request's own timeout can fire before the wait above: the same outcome, one wording.
                cause = c instanceof java.net.http.HttpTimeoutException
                        ? "no answer within " + tryTimeout.toMillis() + " ms"
                        : c.getClass().getSimpleName() + (c.getMessage() == null ? "" : " " + c.getMessage());
                continue;
            } catch (InterruptedException e) {
                // The task is being cancelled: give up at once and keep the interrupt for Flink.
                Thread.currentThread().interrupt();
                cause = "interrupted";
                break;
            }
            int status = response.statusCode();
            if (status == 200) {
                downCause = null;
                return parse(id, response.body());
            }
            if (status == 404) {
                downCause = null;
                return new Lookup(null, "unknown schema id: " + id + " is not in the registry", false);
            }
            cause = "HTTP " + status;
            if (status < 500 && status != 429) {
                break; // a refusal (401, 403, ...) is not cured by asking again now
            }
        }
        downCause = SchemaResolver.bounded(cause);
        downUntilNanos = System.nanoTime() + COOL_DOWN.toNanos();
        return unreachable(id, downCause);
    }

    private static Lookup unreachable(long id, String cause) {
        return new Lookup(null, "schema registry unreachable: schema id " + id + ", " + cause, true);
    }

    /** The answer's body, or an empty one when it announces more than a schema could take. */
    private static HttpResponse.BodySubscriber<byte[]> boundedBody(HttpResponse.ResponseInfo info) {
        long declared = info.headers().firstValueAsLong("Content-Length").orElse(-1);
        return declared > MAX_RESPONSE_BYTES ? HttpResponse.BodySubscribers.replacing(new byte[0]) : HttpResponse.BodySubscribers.ofByteArray();
    }

    /** {@code {"schema": "<Avro schema JSON>", "schemaType": "AVRO" (or absent)}}. */
    private static Lookup parse(long id, byte[] body) {
        String what = "schema id " + id + " in the registry is not an Avro schema: ";
        if (body.length == 0 || body.length > MAX_RESPONSE_BYTES) {
            return new Lookup(null, what + "answer of " + body.length + " bytes", false);
        }
        try {
            JsonNode answer = JSON.readTree(body);
            JsonNode type = answer.get("schemaType");
            if (type != null && !type.isNull() && !"AVRO".equalsIgnoreCase(type.asText())) {
                return new Lookup(null, what + "schemaType " + SchemaResolver.bounded(type.asText()), false);
            }
            JsonNode schema = answer.get("schema");
            if (schema == null || !schema.isTextual()) {
                return new Lookup(null, what + "no \"schema\" string in the answer", false);
            }
            return new Lookup(new Schema.Parser().parse(schema.asText()), null, false);
        } catch (IOException | RuntimeException e) {
            return new Lookup(null, what + SchemaResolver.bounded(String.valueOf(e.getMessage())), false);
        }
    }

    private static boolean sleep(long ms) {
        try {
            Thread.sleep(ms);
            return true;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        }
    }
}
