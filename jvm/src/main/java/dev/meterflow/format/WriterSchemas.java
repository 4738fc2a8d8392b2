package dev.meterflow.format;

import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;

import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.SchemaNormalization;

/**
 * The reader schema (avro/usage_event.avsc) and every writer schema in avro/history/
 * ({@code usage_event-v1.avsc}, {@code -v2}, ... without gaps), bundled in the jar, by their
 * CRC-64-AVRO fingerprint of the Parsing Canonical Form: what an Avro single-object message names
 * in its header. Loaded once per task.
 */
final class WriterSchemas {

    static final String READER = "/avro/usage_event.avsc";
    static final String HISTORY = "/avro/history/usage_event-v%d.avsc";

    private final Schema reader;
    private final long readerFingerprint;
    private final List<Schema> history;
    /** A resolver per history writer that is not the reader itself. */
    private final Map<Long, SchemaResolver> resolvers;

    private WriterSchemas(Schema reader, List<Schema> history) {
        this.reader = reader;
        this.readerFingerprint = SchemaNormalization.parsingFingerprint64(reader);
        this.history = List.copyOf(history);
        Map<Long, SchemaResolver> byFingerprint = new HashMap<>();
        for (Schema writer : history) {
            long fingerprint = SchemaNormalization.parsingFingerprint64(writer);
            if (fingerprint != readerFingerprint) {
                byFingerprint.put(fingerprint, new SchemaResolver(writer, reader));
            }
        }
        this.resolvers = Collections.unmodifiableMap(byFingerprint);
    }

    /** From the jar's resources; a missing or unparsable bundled schema is a build error, not an input error. */
    static WriterSchemas load() {
        Schema reader = parse(READER);
        if (reader == null) {
            throw new IllegalStateException(READER + " is not in the jar");
        }
        List<Schema> history = new ArrayList<>();
        for (int version = 1; ; version++) {
            Schema writer = parse(String.format(HISTORY, version));
            if (writer == null) {
                break;
            }
            history.add(writer);
        }
        return new WriterSchemas(reader, history);
    }

    private static Schema parse(String resource) {
        try (InputStream in = WriterSchemas.class.getResourceAsStream(resource)) {
            return in == null ? null : new Schema.Parser().parse(in);
        } catch (IOException | RuntimeException e) {
            throw new IllegalStateException("cannot parse the bundled schema " + resource + ": " + e.getMessage(), e);
        }
    }

    Schema reader() {
        return reader;
    }

    long readerFingerprint() {
        return readerFingerprint;
    }

    /** avro/history in version order (v1 first). */
    List<Schema> history() {
        return history;
    }

    /** The resolver of a history writer other than the reader, or null when the fingerprint is not in the history. */
    SchemaResolver resolver(long fingerprint) {
        return resolvers.get(fingerprint);
    }

    /**
     * The fingerprint as the 8 bytes of a single-object header in hex (little-endian), the way
     * fastavro.schema.fingerprint and connectors/avro_codec.py print it.
     */
    static String hex(long fingerprint) {
        return HexFormat.of().toHexDigits(Long.reverseBytes(fingerprint));
    }
}
