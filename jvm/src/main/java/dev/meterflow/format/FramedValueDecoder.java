package dev.meterflow.format;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.function.LongSupplier;

import org.apache.flink.table.data.GenericRowData;

/**
 * Decodes a Kafka value in any of the three framings a producer may use, told apart by the first
 * bytes of each message:
 *
 * <ul>
 *   <li>plain Avro binary of the reader schema (avro/usage_event.avsc): anything else;
 *   <li>Avro single-object encoding: {@code C3 01}, the 8-byte little-endian CRC-64-AVRO fingerprint
 *       of the writer schema's Parsing Canonical Form, the body; the writer must be in avro/history;
 *   <li>schema-registry wire format: {@code 00}, the 4-byte big-endian schema id, the body; only
 *       with a registry configured.
 * </ul>
 *
 * <p>The prefixes cannot be plain records: {@code C3} starts a negative string length, and a plain
 * record starting with {@code 00} has an empty event_id, which the job rejects anyway. A body of
 * another writer schema is resolved to a plain body of the reader schema first, so every message
 * ends in {@link UsageEventDecoder}, the one place that checks events. Like it, never throws.
 */
final class FramedValueDecoder {

    static final byte SINGLE_OBJECT = (byte) 0xC3;
    static final byte SINGLE_OBJECT_VERSION = 0x01;
    static final int SINGLE_OBJECT_HEADER = 10;
    static final byte REGISTRY = 0x00;
    static final int REGISTRY_HEADER = 5;
    static final String NO_REGISTRY = "schema registry framing, but no kafka.schema_registry_url is configured";
    /** Registry schema ids whose answer (a resolver or a lasting reason) is kept; a hostile producer cycling ids cannot grow it further. */
    static final int MAX_CACHED_IDS = 1000;
    /**
     * Registry lookups of ids not yet cached, per second and task: a real topic has a handful of ids,
     * a producer cycling through random ids would otherwise cost an HTTP request per message.
     */
    static final int MAX_LOOKUPS_PER_SECOND = 20;

    private final UsageEventDecoder plain = new UsageEventDecoder();
    private final WriterSchemas schemas = WriterSchemas.load();
    /** Null when no registry is configured. */
    private final SchemaRegistryClient registry;
    private Map<Long, Object> registryCache;
    /** Nanoseconds for the lookup limit; tests fix it. */
    LongSupplier clock = System::nanoTime;
    private long lookupSecond;
    private int lookupsThisSecond;

    /** @param registryUrl the schema registry's base URL, or null when there is none */
    FramedValueDecoder(String registryUrl) {
        this(registryUrl == null ? null : new SchemaRegistryClient(registryUrl));
    }

    private FramedValueDecoder(SchemaRegistryClient registry) {
        this.registry = registry;
    }

    /** With a registry client of the caller's (tests: other timeouts). */
    static FramedValueDecoder withRegistry(SchemaRegistryClient registry) {
        return new FramedValueDecoder(registry);
    }

    /** Decodes {@code message} into fields 0..{@link UsageEventDecoder#ARITY}-1 of {@code row}; null, or why it is not a usage event. */
    String decodeInto(byte[] message, GenericRowData row) {
        // The plain path's whole extra cost: one byte compared.
        if (message == null || message.length == 0 || (message[0] != SINGLE_OBJECT && message[0] != REGISTRY)) {
            return plain.decodeInto(message, row);
        }
        if (message[0] == SINGLE_OBJECT) {
            return singleObject(message, row);
        }
        return registryFramed(message, row);
    }

    private String singleObject(byte[] message, GenericRowData row) {
        if (message.length > 1 && message[1] != SINGLE_OBJECT_VERSION) {
            // Not single-object either: the plain decoder names the negative length.
            return plain.decodeInto(message, row);
        }
        if (message.length < SINGLE_OBJECT_HEADER) {
            return "truncated single-object header: " + message.length + " of " + SINGLE_OBJECT_HEADER + " bytes";
        }
        long fingerprint = 0;
        for (int i = SINGLE_OBJECT_HEADER - 1; i >= 2; i--) {
            fingerprint = (fingerprint << 8) | (message[i] & 0xff);
        }
        if (fingerprint == schemas.readerFingerprint()) {
            // Copying the body (~100 bytes) keeps UsageEventDecoder's one entry point; cheaper than anything Avro does.
            return plain.decodeInto(Arrays.copyOfRange(message, SINGLE_OBJECT_HEADER, message.length), row);
        }
        SchemaResolver resolver = schemas.resolver(fingerprint);
        if (resolver == null) {
            return "unknown schema fingerprint: " + WriterSchemas.hex(fingerprint)
                    + " is not in avro/history (register the writer schema, then replay the dead letters)";
        }
        return resolved(resolver, message, SINGLE_OBJECT_HEADER, row);
    }

    private String registryFramed(byte[] message, GenericRowData row) {
        if (registry == null) {
            return NO_REGISTRY;
        }
        if (message.length < REGISTRY_HEADER) {
            return "truncated schema registry header: " + message.length + " of " + REGISTRY_HEADER + " bytes";
        }
        long id = ((message[1] & 0xffL) << 24) | ((message[2] & 0xff) << 16) | ((message[3] & 0xff) << 8) | (message[4] & 0xff);
        Object cached = registryCache().get(id);
        if (cached == null) {
            long second = clock.getAsLong() / 1_000_000_000L;
            if (second != lookupSecond) {
                lookupSecond = second;
                lookupsThisSecond = 0;
            }
            if (++lookupsThisSecond > MAX_LOOKUPS_PER_SECOND) {
                return "schema registry lookups over " + MAX_LOOKUPS_PER_SECOND + " new ids a second: schema id " + id + " not looked up (replay later)";
            }
            SchemaRegistryClient.Lookup lookup = registry.fetch(id);
            if (lookup.schema() != null) {
                cached = new SchemaResolver(lookup.schema(), schemas.reader());
            } else if (!lookup.retryable()) {
                cached = lookup.reason();
            } else {
                return lookup.reason();
            }
            registryCache.put(id, cached);
        }
        if (cached instanceof String reason) {
            return reason;
        }
        return resolved((SchemaResolver) cached, message, REGISTRY_HEADER, row);
    }

    private String resolved(SchemaResolver resolver, byte[] message, int offset, GenericRowData row) {
        String reason = resolver.resolve(message, offset, message.length - offset);
        return reason != null ? reason : plain.decodeInto(resolver.takeBody(), row);
    }

    private Map<Long, Object> registryCache() {
        if (registryCache == null) {
            registryCache = new LinkedHashMap<>(16, 0.75f, true) {
                private static final long serialVersionUID = 1L;

                @Override
                protected boolean removeEldestEntry(Map.Entry<Long, Object> eldest) {
                    return size() > MAX_CACHED_IDS;
                }
            };
        }
        return registryCache;
    }
}
