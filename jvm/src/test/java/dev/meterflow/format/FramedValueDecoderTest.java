package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.math.BigDecimal;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

import com.sun.net.httpserver.HttpServer;
import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.SchemaNormalization;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericData;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumWriter;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryEncoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.EncoderFactory;
import org.apache.flink.avro.shaded.org.apache.avro.message.BinaryMessageEncoder;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.MapData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/** Plain, single-object and registry-framed values: each decodes to the same row, every failure is a reason. */
class FramedValueDecoderTest {

    static final Schema READER = schema("/avro/usage_event.avsc");
    static final Schema V1 = schema("/avro/history/usage_event-v1.avsc");
    static final Schema V2 = schema("/avro/history/usage_event-v2.avsc");
    static final long T = 1_780_315_170_000L;

    private HttpServer server;
    private final AtomicInteger requests = new AtomicInteger();

    @AfterEach
    void stopServer() {
        if (server != null) {
            server.stop(0);
        }
    }

    static Schema schema(String resource) {
        try (InputStream in = FramedValueDecoderTest.class.getResourceAsStream(resource)) {
            return new Schema.Parser().parse(in);
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    static GenericRecord event(Schema schema) {
        GenericRecord r = new GenericData.Record(schema);
        r.put("event_id", "e1");
        r.put("tenant_id", "t1");
        r.put("customer_id", "c1");
        r.put("meter", "tokens");
        r.put("quantity", ByteBuffer.wrap(new BigDecimal("12.345678901").unscaledValue().toByteArray()));
        r.put("event_time", T);
        r.put("dimensions", Map.of("model", "m"));
        if (schema.getField("source") != null) {
            r.put("source", "billing-gateway");
        }
        return r;
    }

    /** {@code schema} less one field. */
    static Schema without(Schema schema, String field) {
        java.util.List<Schema.Field> fields = new java.util.ArrayList<>();
        for (Schema.Field f : schema.getFields()) {
            if (!f.name().equals(field)) {
                fields.add(new Schema.Field(f, f.schema()));
            }
        }
        return Schema.createRecord(schema.getName(), schema.getDoc(), schema.getNamespace(), false, fields);
    }

    static byte[] body(GenericRecord record) {
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

    /** Avro's own single-object encoder: the header layout is Avro's, not this project's reading of the spec. */
    static byte[] singleObject(GenericRecord record) {
        try {
            ByteBuffer b = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), record.getSchema()).encode(record);
            return Arrays.copyOfRange(b.array(), b.arrayOffset() + b.position(), b.arrayOffset() + b.limit());
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    static byte[] registryFramed(int id, byte[] body) {
        return ByteBuffer.allocate(5 + body.length).put((byte) 0).putInt(id).put(body).array();
    }

    static byte[] concat(byte[] a, byte[] b) {
        byte[] out = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }

    static String decode(FramedValueDecoder decoder, byte[] message, GenericRowData row) {
        return decoder.decodeInto(message, row);
    }

    static String reason(FramedValueDecoder decoder, byte[] message) {
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        String reason = decoder.decodeInto(message, row);
        assertNotNull(reason, "expected a dead letter");
        for (int i = 0; i < UsageEventDecoder.ARITY; i++) {
            assertNull(row.getField(i), "a rejected record sets no field");
        }
        return reason;
    }

    static void assertTheEvent(FramedValueDecoder decoder, byte[] message) {
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        assertNull(decoder.decodeInto(message, row));
        assertEquals(StringData.fromString("e1"), row.getString(0));
        assertEquals(StringData.fromString("t1"), row.getString(1));
        assertEquals(StringData.fromString("c1"), row.getString(2));
        assertEquals(StringData.fromString("tokens"), row.getString(3));
        assertEquals(new BigDecimal("12.345678901"), row.getDecimal(4, 38, 9).toBigDecimal());
        assertEquals(TimestampData.fromEpochMillis(T), row.getTimestamp(5, 3));
        MapData dims = row.getMap(6);
        assertEquals(1, dims.size());
        assertEquals(StringData.fromString("model"), dims.keyArray().getString(0));
        assertEquals(StringData.fromString("m"), dims.valueArray().getString(0));
    }

    // ---- plain and single-object

    @Test
    void plainAvroOfTheReaderSchemaDecodesAsBefore() {
        FramedValueDecoder decoder = new FramedValueDecoder(null);
        assertTheEvent(decoder, body(event(READER)));
        assertEquals(UsageEventDecoder.EMPTY, reason(decoder, new byte[0]));
        assertEquals(UsageEventDecoder.EMPTY, reason(decoder, null));
    }

    @Test
    void singleObjectOfV1IsTheReaderItself() {
        byte[] message = singleObject(event(V1));
        assertEquals(10 + body(event(V1)).length, message.length);
        assertTheEvent(new FramedValueDecoder(null), message);
    }

    @Test
    void singleObjectOfV2IsResolvedAndItsExtraFieldIgnored() {
        FramedValueDecoder decoder = new FramedValueDecoder(null);
        byte[] message = singleObject(event(V2));
        assertTheEvent(decoder, message);
        // Absent optional field too (null branch), and a second message through the same resolver.
        GenericRecord noSource = event(V2);
        noSource.put("source", null);
        assertTheEvent(decoder, singleObject(noSource));
        assertTheEvent(decoder, message);
    }

    @Test
    void anUnknownFingerprintNamesItInTheHeadersHex() {
        Schema other = new Schema.Parser().parse(V1.toString().replace("\"customer_id\"", "\"account_id\""));
        GenericRecord r = new GenericData.Record(other);
        for (Schema.Field f : V1.getFields()) {
            r.put(f.name().equals("customer_id") ? "account_id" : f.name(), event(V1).get(f.name()));
        }
        byte[] message = singleObject(r);
        String hex = java.util.HexFormat.of().formatHex(message, 2, 10);
        assertEquals(WriterSchemas.hex(SchemaNormalization.parsingFingerprint64(other)), hex);
        assertEquals("unknown schema fingerprint: " + hex + " is not in avro/history (register the writer schema, then replay the dead letters)",
                reason(new FramedValueDecoder(null), message));
    }

    @Test
    void aTruncatedSingleObjectHeaderIsAReasonAtEveryLength() {
        FramedValueDecoder decoder = new FramedValueDecoder(null);
        byte[] full = singleObject(event(V2));
        for (int n = 1; n < 10; n++) {
            assertEquals("truncated single-object header: " + n + " of 10 bytes", reason(decoder, Arrays.copyOf(full, n)));
        }
        // Exactly the header: an empty body of v2, and of v1 (the reader) an empty message.
        assertTrue(reason(decoder, Arrays.copyOf(full, 10)).startsWith("malformed Avro: truncated record"));
        assertEquals(UsageEventDecoder.EMPTY, reason(decoder, Arrays.copyOf(singleObject(event(V1)), 10)));
        // 0xC3 and anything but version 1 is a plain record starting with a negative length.
        assertTrue(reason(decoder, new byte[] {(byte) 0xC3, 0x02, 0, 0}).startsWith("malformed Avro: negative length"));
    }

    @Test
    void aHostileBodyOfAnotherWriterIsAReasonBeforeAvroAllocatesAnything() {
        FramedValueDecoder decoder = new FramedValueDecoder(null);
        byte[] header = Arrays.copyOf(singleObject(event(V2)), 10);
        // event_id of 2^31 - 1 bytes in a 20-byte message: Avro alone would allocate 2 GB.
        byte[] hugeString = {(byte) 0xFE, (byte) 0xFF, (byte) 0xFF, (byte) 0xFF, 0x0F, 1, 2, 3};
        assertEquals("malformed Avro: truncated record (writer schema dev.meterflow.UsageEvent)", reason(decoder, concat(header, hugeString)));
        assertEquals("malformed Avro: negative length -1 (writer schema dev.meterflow.UsageEvent)", reason(decoder, concat(header, new byte[] {1, 0})));
        // A map of 2^30 entries declared in a few bytes: the body up to the map, then its count (zig-zag 2^31).
        GenericRecord noDims = event(V2);
        noDims.put("dimensions", Map.of());
        noDims.put("source", null);
        byte[] upToMap = Arrays.copyOf(body(noDims), body(noDims).length - 2); // drop the map's end and the null branch
        byte[] hugeMap = concat(upToMap, new byte[] {(byte) 0x80, (byte) 0x80, (byte) 0x80, (byte) 0x80, 0x08, 2, 'k', 2, 'v', 0, 0});
        assertEquals("malformed Avro: truncated record: a block of 1073741824 items cannot fit (writer schema dev.meterflow.UsageEvent)",
                reason(decoder, concat(header, hugeMap)));
        byte[] good = body(event(V2));
        // One byte past the record.
        assertEquals(UsageEventDecoder.TRAILING, reason(decoder, concat(singleObject(event(V2)), new byte[] {0})));
        // A union index outside ["null", "string"].
        byte[] badUnion = Arrays.copyOf(good, good.length);
        badUnion[good.length - "billing-gateway".length() - 2] = 4; // zig-zag 2
        assertTrue(reason(decoder, concat(header, badUnion)).startsWith("malformed Avro: union branch 2 out of range"), reason(decoder, concat(header, badUnion)));
    }

    @Test
    void aWriterMissingAReaderFieldWithoutDefaultCannotResolve() {
        Schema noMeter = without(V2, "meter");
        String reason = new SchemaResolver(noMeter, READER).resolve(new byte[] {0}, 0, 1);
        assertTrue(reason.startsWith("schema resolution failed: READER_FIELD_MISSING_DEFAULT_VALUE"), reason);
        assertTrue(reason.length() <= "schema resolution failed: ".length() + SchemaResolver.MAX_DETAIL_CHARS);
        // A field the writer lacks but the reader defaults is fine: dimensions = {}.
        assertNull(SchemaResolver.compatibility(without(V1, "dimensions"), READER));
    }

    @Test
    void logicalTypesMustAgreeThoughTheFingerprintIgnoresThem() {
        Schema scale2 = new Schema.Parser().parse(V2.toString().replace("\"scale\":9", "\"scale\":2"));
        assertEquals("schema resolution failed: field quantity is bytes decimal(38, 9) in the reader, bytes decimal(38, 2) in the writer",
                SchemaResolver.compatibility(scale2, READER));
        Schema micros = new Schema.Parser().parse(V2.toString().replace("timestamp-millis", "timestamp-micros"));
        assertTrue(SchemaResolver.compatibility(micros, READER).contains("field event_time is long timestamp-millis in the reader"));
        Schema fewerDigits = new Schema.Parser().parse(V2.toString().replace("\"precision\":38", "\"precision\":20"));
        assertNull(SchemaResolver.compatibility(fewerDigits, READER));
    }

    @Test
    void everyHistorySchemaResolvesToTheReader() {
        WriterSchemas schemas = WriterSchemas.load();
        assertTrue(schemas.history().size() >= 2);
        for (Schema writer : schemas.history()) {
            assertNull(SchemaResolver.compatibility(writer, schemas.reader()), writer.toString());
        }
    }

    // ---- schema registry framing

    private String registry(Map<String, String[]> answers) throws IOException {
        server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        server.createContext("/schemas/ids/", exchange -> {
            requests.incrementAndGet();
            String id = exchange.getRequestURI().getPath().substring("/schemas/ids/".length());
            String[] answer = answers.getOrDefault(id, new String[] {"404", "{\"error_code\":40403,\"message\":\"Schema not found\"}"});
            if (answer[0].equals("slow")) {
                try {
                    Thread.sleep(2_000);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
                answer = new String[] {"200", answer[1]};
            }
            byte[] bytes = answer[1].getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(Integer.parseInt(answer[0]), bytes.length);
            exchange.getResponseBody().write(bytes);
            exchange.close();
        });
        server.setExecutor(java.util.concurrent.Executors.newCachedThreadPool());
        server.start();
        return "http://127.0.0.1:" + server.getAddress().getPort() + "/";
    }

    /** Tries that wait long enough for a busy test machine; the retry and cool-down logic is the same. */
    static FramedValueDecoder patient(String url) {
        return FramedValueDecoder.withRegistry(new SchemaRegistryClient(url, java.time.Duration.ofSeconds(10)));
    }

    static String schemaAnswer(Schema schema) {
        // The registry's answer: the schema as a JSON string inside a JSON object.
        return "{\"schema\":\"" + schema.toString().replace("\\", "\\\\").replace("\"", "\\\"") + "\"}";
    }

    @Test
    void aRegistryFramedV2ValueIsFetchedOnceAndResolved() throws IOException {
        Map<String, String[]> answers = new HashMap<>();
        answers.put("7", new String[] {"200", schemaAnswer(V2)});
        answers.put("9", new String[] {"200", schemaAnswer(READER)});
        FramedValueDecoder decoder = patient(registry(answers));
        byte[] message = registryFramed(7, body(event(V2)));
        assertTheEvent(decoder, message);
        assertTheEvent(decoder, message);
        assertEquals(1, requests.get(), "one request per schema id and task");
        // The reader schema itself by id: its body is already plain.
        assertTheEvent(decoder, registryFramed(9, body(event(READER))));
        assertEquals(2, requests.get());
        // Exactly the header (an empty body), and one byte short of it.
        assertTrue(reason(decoder, registryFramed(7, new byte[0])).startsWith("malformed Avro: truncated record"));
        assertEquals("truncated schema registry header: 4 of 5 bytes", reason(decoder, Arrays.copyOf(message, 4)));
        assertEquals("truncated schema registry header: 1 of 5 bytes", reason(decoder, new byte[] {0}));
    }

    @Test
    void registryAnswersThatAreNoUsableSchemaAreLastingReasons() throws IOException {
        Map<String, String[]> answers = new HashMap<>();
        answers.put("10", new String[] {"200", schemaAnswer(new Schema.Parser().parse(V2.toString().replace("\"scale\":9", "\"scale\":2")))});
        answers.put("11", new String[] {"200", "{\"schemaType\":\"PROTOBUF\",\"schema\":\"syntax = \\\"proto3\\\";\"}"});
        answers.put("12", new String[] {"200", "{\"schema\":\"{\\\"type\\\":\\\"record\\\"\"}"});
        FramedValueDecoder decoder = patient(registry(answers));
        byte[] body = body(event(V2));
        assertEquals("unknown schema id: 8 is not in the registry", reason(decoder, registryFramed(8, body)));
        assertEquals("unknown schema id: 8 is not in the registry", reason(decoder, registryFramed(8, body)));
        assertEquals(1, requests.get(), "a 404 is remembered");
        assertTrue(reason(decoder, registryFramed(10, body)).startsWith("schema resolution failed: field quantity is bytes decimal(38, 9)"));
        assertEquals("schema id 11 in the registry is not an Avro schema: schemaType PROTOBUF", reason(decoder, registryFramed(11, body)));
        assertTrue(reason(decoder, registryFramed(12, body)).startsWith("schema id 12 in the registry is not an Avro schema: "));
        assertEquals("unknown schema id: 4294967295 is not in the registry", reason(decoder, registryFramed(-1, body)));
    }

    @Test
    void newIdLookupsAreLimitedPerSecondCachedIdsAreNot() throws IOException {
        Map<String, String[]> answers = new HashMap<>();
        answers.put("7", new String[] {"200", schemaAnswer(V2)});
        FramedValueDecoder decoder = patient(registry(answers));
        byte[] body = body(event(V2));
        long[] now = {5_000_000_000L};
        decoder.clock = () -> now[0];
        assertTheEvent(decoder, registryFramed(7, body));
        for (int id = 1000; id < 1000 + FramedValueDecoder.MAX_LOOKUPS_PER_SECOND - 1; id++) {
            assertEquals("unknown schema id: " + id + " is not in the registry", reason(decoder, registryFramed(id, body)));
        }
        assertEquals("schema registry lookups over 20 new ids a second: schema id 5000 not looked up (replay later)",
                reason(decoder, registryFramed(5000, body)));
        assertEquals(FramedValueDecoder.MAX_LOOKUPS_PER_SECOND, requests.get());
        assertTheEvent(decoder, registryFramed(7, body));
        assertEquals("unknown schema id: 1000 is not in the registry", reason(decoder, registryFramed(1000, body)));
        assertEquals(FramedValueDecoder.MAX_LOOKUPS_PER_SECOND, requests.get(), "cached ids need no lookup");
        // The next second, id 5000 is looked up after all.
        now[0] += 1_000_000_000L;
        assertEquals("unknown schema id: 5000 is not in the registry", reason(decoder, registryFramed(5000, body)));
    }

    @Test
    void anUnreachableRegistryIsAReasonAfterABoundedWait() throws IOException {
        int closedPort;
        try (ServerSocket socket = new ServerSocket(0)) {
            closedPort = socket.getLocalPort();
        }
        FramedValueDecoder decoder = new FramedValueDecoder("http://127.0.0.1:" + closedPort);
        long start = System.nanoTime();
        String reason = reason(decoder, registryFramed(7, body(event(V2))));
        long ms = (System.nanoTime() - start) / 1_000_000;
        assertTrue(reason.startsWith("schema registry unreachable: schema id 7, ConnectException"), reason);
        // 3 tries, 200 + 400 ms apart: about 2 s at most on an idle machine (bounded generously for a busy one).
        assertTrue(ms >= 600 && ms < 10_000, "took " + ms + " ms");
    }

    @Test
    void aFailingRegistryIsTriedThreeTimesThenCoolsDown() throws IOException {
        Map<String, String[]> answers = new HashMap<>();
        answers.put("7", new String[] {"503", "{}"});
        answers.put("8", new String[] {"200", schemaAnswer(V2)});
        FramedValueDecoder decoder = patient(registry(answers));
        byte[] body = body(event(V2));
        assertEquals("schema registry unreachable: schema id 7, HTTP 503", reason(decoder, registryFramed(7, body)));
        assertEquals(3, requests.get());
        // Within the cool-down no request at all, for any uncached id; and nothing is remembered as unknown.
        assertEquals("schema registry unreachable: schema id 8, HTTP 503", reason(decoder, registryFramed(8, body)));
        assertEquals(3, requests.get());
    }

    @Test
    void aRegistryThatDoesNotAnswerInTimeIsAReasonAfterABoundedWait() throws IOException {
        Map<String, String[]> answers = new HashMap<>();
        answers.put("7", new String[] {"slow", schemaAnswer(V2)});
        FramedValueDecoder slow = new FramedValueDecoder(registry(answers));
        long start = System.nanoTime();
        assertEquals("schema registry unreachable: schema id 7, no answer within 500 ms", reason(slow, registryFramed(7, body(event(V2)))));
        long ms = (System.nanoTime() - start) / 1_000_000;
        assertTrue(ms >= 3 * 500 + 600 && ms < 10_000, "took " + ms + " ms");
    }

    @Test
    void registryFramingWithoutARegistryIsAReason() {
        FramedValueDecoder decoder = new FramedValueDecoder(null);
        assertEquals(FramedValueDecoder.NO_REGISTRY, reason(decoder, registryFramed(7, body(event(V2)))));
        assertEquals(FramedValueDecoder.NO_REGISTRY, reason(decoder, new byte[] {0}));
    }
}
