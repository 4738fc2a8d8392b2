package dev.meterflow.udf;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.avro.shaded.org.apache.avro.LogicalTypes;
import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumReader;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryDecoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.DecoderFactory;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.types.Row;

/**
 * Decodes one plain-Avro usage event (avro/usage_event.avsc). Never throws: a payload that is not
 * a valid record yields a row whose only non-null field is {@code error}, so the job routes it to
 * the dead-letter topic and keeps running.
 */
public class DecodeUsageEvent extends ScalarFunction {

    /** Kept in step with the .avsc by tests/unit/test_udf_contract.py. */
    public static final String ROW_TYPE =
            "ROW<`event_id` STRING, `tenant_id` STRING, `customer_id` STRING, `meter` STRING, "
                    + "`quantity` DECIMAL(38, 9), `event_time` TIMESTAMP(3), "
                    + "`dimensions` MAP<STRING, STRING>, `error` STRING>";

    private static final String SCHEMA_RESOURCE = "/avro/usage_event.avsc";
    private static final int MAX_PRECISION = 38;

    private transient GenericDatumReader<GenericRecord> reader;
    private transient BinaryDecoder decoder;
    private transient int quantityScale;
    // The planner turns each `event`.`field` into its own call, and the source's watermark, the
    // counting branch and the dead-letter branch each hold an instance of this function, all chained
    // in one task thread: one decode per record, shared through a per-thread last-record cache.
    private static final ThreadLocal<Object[]> LAST = ThreadLocal.withInitial(() -> new Object[2]);

    @Override
    public void open(FunctionContext context) throws IOException {
        init();
    }

    private void init() throws IOException {
        try (InputStream in = DecodeUsageEvent.class.getResourceAsStream(SCHEMA_RESOURCE)) {
            if (in == null) {
                throw new IOException("schema resource " + SCHEMA_RESOURCE + " missing from the jar");
            }
            Schema schema = new Schema.Parser().parse(in);
            reader = new GenericDatumReader<>(schema);
            quantityScale = ((LogicalTypes.Decimal) schema.getField("quantity").schema().getLogicalType()).getScale();
        }
    }

    public @DataTypeHint(ROW_TYPE) Row eval(byte[] payload) {
        if (reader == null) {
            try {
                init();
            } catch (IOException e) {
                // The jar itself is broken: fail loudly rather than dead-letter every record.
                throw new UncheckedIOException(e);
            }
        }
        Object[] last = LAST.get();
        byte[] lastPayload = (byte[]) last[0];
        if (payload != null && lastPayload != null && (payload == lastPayload || Arrays.equals(payload, lastPayload))) {
            return (Row) last[1];
        }
        Row row = decode(payload);
        last[0] = payload;
        last[1] = row;
        return row;
    }

    private Row decode(byte[] payload) {
        if (payload == null || payload.length == 0) {
            return error("malformed Avro: empty message");
        }
        GenericRecord record;
        try {
            decoder = DecoderFactory.get().binaryDecoder(payload, decoder);
            record = reader.read(null, decoder);
            if (!decoder.isEnd()) {
                return error("malformed Avro: trailing bytes after the record");
            }
        } catch (IOException | RuntimeException e) {
            return error("malformed Avro: " + e.getClass().getSimpleName() + ": " + e.getMessage());
        }
        ByteBuffer unscaled = (ByteBuffer) record.get("quantity");
        byte[] bytes = new byte[unscaled.remaining()];
        unscaled.get(bytes);
        BigDecimal quantity = new BigDecimal(new BigInteger(bytes), quantityScale);
        if (quantity.precision() > MAX_PRECISION) {
            return error("quantity exceeds decimal(38, " + quantityScale + ")");
        }
        long millis = (Long) record.get("event_time");
        Map<String, String> dimensions = new HashMap<>();
        Object dims = record.get("dimensions");
        if (dims instanceof Map<?, ?> map) {
            for (Map.Entry<?, ?> e : map.entrySet()) {
                dimensions.put(e.getKey().toString(), e.getValue().toString());
            }
        }
        return Row.of(
                str(record.get("event_id")),
                str(record.get("tenant_id")),
                str(record.get("customer_id")),
                str(record.get("meter")),
                quantity,
                LocalDateTime.ofInstant(Instant.ofEpochMilli(millis), ZoneOffset.UTC),
                dimensions,
                null);
    }

    private static String str(Object value) {
        return value == null ? null : value.toString();
    }

    private static Row error(String reason) {
        return Row.of(null, null, null, null, null, null, null, reason);
    }
}
