package dev.meterflow.format;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

import org.apache.flink.avro.shaded.org.apache.avro.LogicalType;
import org.apache.flink.avro.shaded.org.apache.avro.LogicalTypes;
import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.SchemaCompatibility;
import org.apache.flink.avro.shaded.org.apache.avro.SchemaNormalization;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumReader;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumWriter;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryDecoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryEncoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.DecoderFactory;
import org.apache.flink.avro.shaded.org.apache.avro.io.EncoderFactory;

/**
 * Turns a body written with one writer schema into plain binary of the reader schema
 * (avro/usage_event.avsc), with Avro's own schema resolution, so the usage event decoder stays the
 * one place that reads and checks events. One instance per writer schema per task; decided once
 * whether the writer resolves at all.
 */
final class SchemaResolver {

    static final String FAILED = "schema resolution failed: ";
    /** Bound on a resolution reason: the dead letter keeps the message, the reason only needs to point at the cause. */
    static final int MAX_DETAIL_CHARS = 300;

    private final Schema writer;
    /** Why the writer cannot be read as the reader, or null. */
    private final String incompatible;
    /** The writer is the reader's binary layout with the same logical types: the body is already plain. */
    private final boolean direct;
    private final GenericDatumReader<Object> datumReader;
    private final GenericDatumWriter<Object> datumWriter;
    private final AvroBodyBounds bounds = new AvroBodyBounds();
    private final ByteArrayOutputStream out = new ByteArrayOutputStream(256);
    private BinaryDecoder decoder;
    private BinaryEncoder encoder;
    private byte[] body;

    SchemaResolver(Schema writer, Schema reader) {
        this.writer = writer;
        String reason;
        try {
            reason = compatibility(writer, reader);
        } catch (RuntimeException e) {
            // A registry may hold schemas Avro's checker trips on; that is a reason for their messages, not a task failure.
            reason = FAILED + bounded(String.valueOf(e.getMessage()));
        }
        this.incompatible = reason;
        this.direct = reason == null && SchemaNormalization.parsingFingerprint64(writer) == SchemaNormalization.parsingFingerprint64(reader);
        this.datumReader = reason == null && !direct ? new GenericDatumReader<>(writer, reader) : null;
        this.datumWriter = reason == null && !direct ? new GenericDatumWriter<>(reader) : null;
    }

    Schema writer() {
        return writer;
    }

    /** Why no message of this writer can be read, or null. */
    String incompatibility() {
        return incompatible;
    }

    /**
     * Resolves {@code message[offset, offset + length)}; on success {@link #takeBody()} is a plain
     * reader-schema body (a new array: the decoded row's strings are slices of it).
     *
     * @return null on success, else why the body cannot be resolved
     */
    String resolve(byte[] message, int offset, int length) {
        body = null;
        if (incompatible != null) {
            return incompatible;
        }
        if (direct) {
            body = Arrays.copyOfRange(message, offset, offset + length);
            return null;
        }
        String malformed = bounds.check(writer, message, offset, length);
        if (malformed != null) {
            return malformed;
        }
        try {
            decoder = DecoderFactory.get().binaryDecoder(message, offset, length, decoder);
            Object record = datumReader.read(null, decoder);
            out.reset();
            encoder = EncoderFactory.get().directBinaryEncoder(out, encoder);
            datumWriter.write(record, encoder);
            encoder.flush();
        } catch (IOException | RuntimeException e) {
            // The body is in bounds, so this is data the reader has no place for (e.g. an enum symbol or union branch it lacks).
            return FAILED + bounded(e.getMessage() == null ? e.getClass().getSimpleName() : e.getMessage());
        }
        body = out.toByteArray();
        return null;
    }

    byte[] takeBody() {
        byte[] b = body;
        body = null;
        return b;
    }

    /** Avro's reader/writer compatibility, plus what it leaves out: logical types must agree, or a decimal's scale would be misread. */
    static String compatibility(Schema writer, Schema reader) {
        SchemaCompatibility.SchemaPairCompatibility pair = SchemaCompatibility.checkReaderWriterCompatibility(reader, writer);
        if (pair.getType() != SchemaCompatibility.SchemaCompatibilityType.COMPATIBLE) {
            List<String> problems = new ArrayList<>();
            for (SchemaCompatibility.Incompatibility i : pair.getResult().getIncompatibilities()) {
                problems.add(i.getType() + " at " + i.getLocation() + ": " + i.getMessage());
            }
            return FAILED + bounded(String.join("; ", problems));
        }
        if (reader.getType() != Schema.Type.RECORD || writer.getType() != Schema.Type.RECORD) {
            return null;
        }
        for (Schema.Field field : reader.getFields()) {
            Schema.Field written = writer.getField(field.name());
            for (String alias : field.aliases()) {
                written = written == null ? writer.getField(alias) : written;
            }
            if (written == null) {
                continue;
            }
            List<Schema> branches = written.schema().getType() == Schema.Type.UNION ? written.schema().getTypes() : List.of(written.schema());
            for (Schema branch : branches) {
                if (branch.getType() != Schema.Type.NULL && !sameLogicalType(field.schema().getLogicalType(), branch.getLogicalType())) {
                    return FAILED + bounded("field " + field.name() + " is " + describe(field.schema()) + " in the reader, "
                            + describe(branch) + " in the writer");
                }
            }
        }
        return null;
    }

    /** Equal logical types; a decimal may be written with fewer digits, never with another scale. */
    private static boolean sameLogicalType(LogicalType reader, LogicalType writer) {
        if (reader instanceof LogicalTypes.Decimal r && writer instanceof LogicalTypes.Decimal w) {
            return r.getScale() == w.getScale() && w.getPrecision() <= r.getPrecision();
        }
        return reader == null ? writer == null : reader.equals(writer);
    }

    private static String describe(Schema schema) {
        LogicalType t = schema.getLogicalType();
        if (t instanceof LogicalTypes.Decimal d) {
            return schema.getType().getName() + " decimal(" + d.getPrecision() + ", " + d.getScale() + ")";
        }
        return schema.getType().getName() + (t == null ? "" : " " + t.getName());
    }

    static String bounded(String detail) {
        return detail.length() <= MAX_DETAIL_CHARS ? detail : detail.substring(0, MAX_DETAIL_CHARS - 3) + "...";
    }
}
