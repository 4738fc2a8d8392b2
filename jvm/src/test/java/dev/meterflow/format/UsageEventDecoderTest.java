package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.apache.flink.avro.shaded.org.apache.avro.LogicalTypes;
import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericData;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumReader;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumWriter;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryEncoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.DecoderFactory;
import org.apache.flink.avro.shaded.org.apache.avro.io.EncoderFactory;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.MapData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.junit.jupiter.api.Test;

/** The hand-written decoder against Avro's own writer and reader: good records exact, every bad one a reason. */
class UsageEventDecoderTest {

    static final Schema SCHEMA = bundledSchema();
    static final long T = 1_780_315_170_000L; // 2026-06-01T12:00:00Z - 30 s

    static Schema bundledSchema() {
        try (InputStream in = UsageEventDecoderTest.class.getResourceAsStream("/avro/usage_event.avsc")) {
            return new Schema.Parser().parse(in);
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    static GenericRecord event(Schema schema, String id, BigDecimal quantity, long eventTimeMs, Map<String, String> dims) {
        GenericRecord r = new GenericData.Record(schema);
        r.put("event_id", id);
        r.put("tenant_id", "t1");
        r.put("customer_id", "c1");
        r.put("meter", "tokens");
        r.put("quantity", ByteBuffer.wrap(quantity.setScale(9).unscaledValue().toByteArray()));
        r.put("event_time", eventTimeMs);
        r.put("dimensions", dims);
        return r;
    }

    static byte[] encode(GenericRecord record) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        BinaryEncoder encoder = EncoderFactory.get().binaryEncoder(out, null);
        try {
            new GenericDatumWriter<GenericRecord>(record.getSchema()).write(record, encoder);
            encoder.flush();
        } catch (IOException e) {
            throw new AssertionError(e);
        }
        return out.toByteArray();
    }

    static byte[] good() {
        return encode(event(SCHEMA, "e1", new BigDecimal("12.345678901"), T, Map.of("model", "m")));
    }

    static String decode(byte[] message, GenericRowData row) {
        return new UsageEventDecoder().decodeInto(message, row);
    }

    static String reason(byte[] message) {
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        String reason = decode(message, row);
        for (int i = 0; i < UsageEventDecoder.ARITY; i++) {
            assertNull(row.getField(i), "a rejected record sets no field");
        }
        return reason;
    }

    @Test
    void goodRecordDecodesIntoInternalStructures() {
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        assertNull(decode(good(), row));
        assertEquals(StringData.fromString("e1"), row.getString(0));
        assertEquals(StringData.fromString("t1"), row.getString(1));
        assertEquals(StringData.fromString("c1"), row.getString(2));
        assertEquals(StringData.fromString("tokens"), row.getString(3));
        DecimalData quantity = row.getDecimal(4, 38, 9);
        assertEquals(new BigDecimal("12.345678901"), quantity.toBigDecimal());
        assertEquals(38, quantity.precision());
        assertEquals(9, quantity.scale());
        assertEquals(TimestampData.fromEpochMillis(T), row.getTimestamp(5, 3));
        MapData dims = row.getMap(6);
        assertEquals(1, dims.size());
        assertEquals(StringData.fromString("model"), dims.keyArray().getString(0));
        assertEquals(StringData.fromString("m"), dims.valueArray().getString(0));
    }

    @Test
    void decodesWhatAvrosWriterWritesExactlyAsAvrosReaderReadsIt() throws IOException {
        Random random = new Random(42);
        GenericDatumReader<GenericRecord> reader = new GenericDatumReader<>(SCHEMA);
        UsageEventDecoder decoder = new UsageEventDecoder();
        for (int n = 0; n < 2_000; n++) {
            // Quantities of every width up to 38 digits, negative too (past 10^15 the contract refuses
            // them; up to it, 80 bits: the long and the BigInteger paths); non-ASCII text; 0..4 dimensions.
            BigInteger unscaled = new BigInteger(1 + random.nextInt(n % 2 == 0 ? 80 : 125), random);
            BigDecimal quantity = new BigDecimal(random.nextBoolean() ? unscaled : unscaled.negate(), 9);
            Map<String, String> dims = new HashMap<>();
            for (int d = random.nextInt(5); d > 0; d--) {
                dims.put("k" + random.nextInt(100), "välue-" + random.nextInt() + "-€");
            }
            long ms = random.nextLong(UsageEventDecoder.MIN_EVENT_TIME_MS, UsageEventDecoder.MAX_EVENT_TIME_MS + 1);
            byte[] bytes = encode(event(SCHEMA, "é" + n, quantity, ms, dims));
            GenericRecord expected = reader.read(null, DecoderFactory.get().binaryDecoder(bytes, null));
            GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
            if (quantity.abs().compareTo(InputContract.MAX_ABS_QUANTITY) > 0) {
                // Decoded all the same (any width), then refused by the input contract.
                assertEquals("contract: |quantity| exceeds 1000000000000000", decoder.decodeInto(bytes, row), "record " + n);
                continue;
            }
            assertNull(decoder.decodeInto(bytes, row), "record " + n);
            assertEquals(expected.get("event_id").toString(), row.getString(0).toString());
            assertEquals(quantity, row.getDecimal(4, 38, 9).toBigDecimal());
            ByteBuffer q = (ByteBuffer) expected.get("quantity");
            byte[] qb = new byte[q.remaining()];
            q.get(qb);
            assertEquals(new BigDecimal(new BigInteger(qb), 9), row.getDecimal(4, 38, 9).toBigDecimal());
            assertEquals(expected.get("event_time"), row.getTimestamp(5, 3).getMillisecond());
            Map<String, String> gotDims = new HashMap<>();
            MapData map = row.getMap(6);
            for (int i = 0; i < map.size(); i++) {
                gotDims.put(map.keyArray().getString(i).toString(), map.valueArray().getString(i).toString());
            }
            assertEquals(dims, gotDims);
        }
    }

    @Test
    void oneDecoderServesGoodAndBadRecordsInAnyOrder() {
        UsageEventDecoder decoder = new UsageEventDecoder();
        byte[] good = good();
        for (byte[] message : List.of(good, new byte[] {1, 2, 3}, good, Arrays.copyOf(good, 5), good)) {
            GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
            String reason = decoder.decodeInto(message, row);
            assertEquals(message == good, reason == null, String.valueOf(reason));
        }
    }

    @Test
    void everyTruncationIsRejected() {
        byte[] good = good();
        for (int length = 1; length < good.length; length++) {
            String reason = reason(Arrays.copyOf(good, length));
            assertTrue(reason.startsWith("malformed Avro: truncated record"), length + ": " + reason);
        }
        assertEquals("malformed Avro: truncated record in field meter", reason(Arrays.copyOf(good, 10)));
    }

    @Test
    void emptyAndNullMessagesAreRejected() {
        assertEquals(UsageEventDecoder.EMPTY, reason(new byte[0]));
        assertEquals(UsageEventDecoder.EMPTY, reason(null));
    }

    @Test
    void trailingBytesAreRejected() {
        byte[] good = good();
        byte[] longer = Arrays.copyOf(good, good.length + 1);
        assertEquals(UsageEventDecoder.TRAILING, reason(longer));
    }

    @Test
    void recordsOfAnotherSchemaAreRejected() {
        // The same fields with the quantity as a binary float (refused by the project) ...
        Schema doubles = parse(SCHEMA.toString().replace("{\"type\":\"bytes\",\"logicalType\":\"decimal\",\"precision\":38,\"scale\":9}", "\"double\""));
        GenericRecord r = new GenericData.Record(doubles);
        for (Schema.Field f : doubles.getFields()) {
            r.put(f.name(), f.name().equals("quantity") ? 1.5 : f.name().equals("event_time") ? T : f.name().equals("dimensions") ? Map.of() : "x");
        }
        assertTrue(reason(encode(r)).startsWith("malformed Avro: "), reason(encode(r)));
        // ... and an entirely different record (the dead-letter schema, whose first field is bytes).
        Schema deadLetter = parse("{\"type\":\"record\",\"name\":\"DeadLetter\",\"fields\":[{\"name\":\"payload\",\"type\":\"bytes\"},"
                + "{\"name\":\"reason\",\"type\":\"string\"},{\"name\":\"source_partition\",\"type\":\"int\"}]}");
        GenericRecord d = new GenericData.Record(deadLetter);
        d.put("payload", ByteBuffer.wrap(good()));
        d.put("reason", "x");
        d.put("source_partition", 2);
        assertTrue(reason(encode(d)).startsWith("malformed Avro: "), reason(encode(d)));
    }

    @Test
    void recordsMissingFieldsAreRejected() {
        // Written by a producer whose schema lacks the trailing fields: binary Avro has no field names,
        // so the record simply ends early.
        Schema noDims = withoutFields("dimensions");
        assertEquals("malformed Avro: truncated record in field dimensions", reason(encode(copy(noDims))));
        Schema noTimeNoDims = withoutFields("event_time", "dimensions");
        assertEquals("malformed Avro: truncated record in field event_time", reason(encode(copy(noTimeNoDims))));
    }

    @Test
    void eventTimesOutsideTimestamp3AreRejectedAndItsBoundsAccepted() {
        for (long ms : new long[] {UsageEventDecoder.MIN_EVENT_TIME_MS, UsageEventDecoder.MAX_EVENT_TIME_MS, 0}) {
            GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
            assertNull(decode(encode(event(SCHEMA, "e", BigDecimal.ONE, ms, Map.of())), row));
            assertEquals(ms, row.getTimestamp(5, 3).getMillisecond());
        }
        for (long ms : new long[] {UsageEventDecoder.MAX_EVENT_TIME_MS + 1, UsageEventDecoder.MIN_EVENT_TIME_MS - 1, Long.MAX_VALUE, Long.MIN_VALUE}) {
            assertEquals(
                    "event_time out of range: " + ms + " ms since the epoch is outside TIMESTAMP(3) (years 1 to 9999)",
                    reason(encode(event(SCHEMA, "e", BigDecimal.ONE, ms, Map.of()))));
        }
    }

    @Test
    void quantityBeyondDecimal38IsRejectedAndItsLargestLeftToTheContract() {
        BigDecimal largest = new BigDecimal(BigInteger.TEN.pow(38).subtract(BigInteger.ONE), 9);
        assertEquals("contract: |quantity| exceeds 1000000000000000", reason(encode(event(SCHEMA, "e", largest.negate(), T, Map.of()))));
        BigDecimal tooLarge = new BigDecimal(BigInteger.TEN.pow(38), 9);
        assertEquals(UsageEventDecoder.QUANTITY_OVERFLOW, reason(encode(event(SCHEMA, "e", tooLarge, T, Map.of()))));
    }

    @Test
    void malformedEncodingsAreRejectedWithWhatIsWrong() {
        byte[] ok = "ok".getBytes(StandardCharsets.UTF_8);
        assertEquals("malformed Avro: negative length -2 in field event_id", reason(new byte[] {3, 'a'}));
        assertEquals("malformed Avro: varint longer than 10 bytes in field event_id", reason(new byte[] {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1}));
        assertEquals("malformed Avro: invalid UTF-8 in field event_id", reason(new byte[] {4, (byte) 0xc3, (byte) 0x28}));
        // Four ids, then a zero-length decimal.
        byte[] emptyDecimal = concat(str(ok), str(ok), str(ok), str(ok), new byte[] {0});
        assertEquals("malformed Avro: empty decimal in field quantity", reason(emptyDecimal));
        // A map block claiming more entries than the record has bytes for.
        byte[] hugeMap = concat(str(ok), str(ok), str(ok), str(ok), new byte[] {2, 1}, new byte[] {2}, new byte[] {(byte) 0xfe, 0x7f});
        assertTrue(reason(hugeMap).equals("malformed Avro: truncated record: a map block of 8191 entries cannot fit in field dimensions"), reason(hugeMap));
    }

    @Test
    void mapBlocksWithByteSizesAreDecoded() {
        // A writer may emit a negative block count followed by the block's byte size (Avro spec).
        byte[] ok = "ok".getBytes(StandardCharsets.UTF_8);
        byte[] entries = concat(str("a".getBytes(StandardCharsets.UTF_8)), str(ok), str("b".getBytes(StandardCharsets.UTF_8)), str(ok));
        byte[] message = concat(str(ok), str(ok), str(ok), str(ok), new byte[] {2, 1}, new byte[] {2},
                new byte[] {3, (byte) (entries.length * 2)}, entries, new byte[] {0});
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        assertNull(decode(message, row));
        assertEquals(2, row.getMap(6).size());
        assertEquals(new BigDecimal("0.000000001"), row.getDecimal(4, 38, 9).toBigDecimal());
    }

    @Test
    void rowTypeIsTheBundledSchemaInFieldOrder() {
        List<String> names = new ArrayList<>();
        for (Schema.Field f : SCHEMA.getFields()) {
            names.add(f.name());
        }
        assertEquals(List.of(UsageEventDecoder.FIELDS), names);
        LogicalTypes.Decimal decimal = (LogicalTypes.Decimal) SCHEMA.getField("quantity").schema().getLogicalType();
        assertEquals(UsageEventDecoder.PRECISION, decimal.getPrecision());
        assertEquals(UsageEventDecoder.SCALE, decimal.getScale());
        assertEquals(Schema.Type.BYTES, SCHEMA.getField("quantity").schema().getType());
        assertEquals("timestamp-millis", SCHEMA.getField("event_time").schema().getLogicalType().getName());
        assertEquals(Schema.Type.STRING, SCHEMA.getField("dimensions").schema().getValueType().getType());
        for (int i = 0; i < 4; i++) {
            assertEquals(Schema.Type.STRING, SCHEMA.getFields().get(i).schema().getType());
        }
    }

    static Schema parse(String json) {
        return new Schema.Parser().parse(json);
    }

    static Schema withoutFields(String... dropped) {
        List<Schema.Field> fields = new ArrayList<>();
        for (Schema.Field f : SCHEMA.getFields()) {
            if (!List.of(dropped).contains(f.name())) {
                fields.add(new Schema.Field(f, f.schema()));
            }
        }
        return Schema.createRecord("UsageEvent", null, "dev.meterflow", false, fields);
    }

    static GenericRecord copy(Schema schema) {
        GenericRecord full = event(SCHEMA, "e1", BigDecimal.ONE, T, Map.of());
        GenericRecord r = new GenericData.Record(schema);
        for (Schema.Field f : schema.getFields()) {
            r.put(f.name(), full.get(f.name()));
        }
        return r;
    }

    static byte[] str(byte[] utf8) {
        return concat(new byte[] {(byte) (utf8.length * 2)}, utf8);
    }

    static byte[] concat(byte[]... parts) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        for (byte[] p : parts) {
            out.writeBytes(p);
        }
        return out.toByteArray();
    }
}
