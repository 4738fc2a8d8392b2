package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.InputStream;
import java.lang.management.ManagementFactory;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.Map;

import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.table.data.GenericRowData;
import org.junit.jupiter.api.Test;

/** The input contract in the decoder: each limit exactly at it and one past it, Python's exact reasons. */
class InputContractTest {

    static final String[] IDS = InputContract.ID_FIELDS;
    static final int[] LIMITS = InputContract.MAX_ID_BYTES;
    static final BigDecimal MAX = InputContract.MAX_ABS_QUANTITY;
    static final BigDecimal EPSILON = new BigDecimal("0.000000001");

    static GenericRecord record() {
        Map<String, String> dims = new LinkedHashMap<>();
        dims.put("region", "eu");
        return UsageEventDecoderTest.event(UsageEventDecoderTest.SCHEMA, "e1", new BigDecimal("1.5"), UsageEventDecoderTest.T, dims);
    }

    static GenericRecord with(String field, Object value) {
        GenericRecord r = record();
        r.put(field, value);
        return r;
    }

    static GenericRecord withDims(Map<String, String> dims) {
        return with("dimensions", dims);
    }

    static GenericRecord withQuantity(BigDecimal quantity) {
        return UsageEventDecoderTest.event(UsageEventDecoderTest.SCHEMA, "e1", quantity, UsageEventDecoderTest.T, Map.of());
    }

    static Map<String, String> dims(int n) {
        Map<String, String> dims = new LinkedHashMap<>();
        for (int i = 0; i < n; i++) {
            dims.put("k" + i, "v");
        }
        return dims;
    }

    static Map<String, String> dim(String key, String value) {
        Map<String, String> dims = new LinkedHashMap<>();
        dims.put(key, value);
        return dims;
    }

    /** The decoder's reason; an accepted record has every field set, a rejected one none. */
    static String reason(GenericRecord record) {
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        String reason = new UsageEventDecoder().decodeInto(UsageEventDecoderTest.encode(record), row);
        for (int i = 0; i < UsageEventDecoder.ARITY; i++) {
            assertEquals(reason == null, row.getField(i) != null, "field " + i + " with reason " + reason);
        }
        return reason;
    }

    static String repeat(String s, int n) {
        return s.repeat(n);
    }

    @Test
    void everyCaseOfThePythonTableGetsPythonsReason() throws IOException {
        JsonNode cases;
        try (InputStream in = InputContractTest.class.getResourceAsStream("/input_contract_cases.json")) {
            assertNotNull(in, "jvm/src/test/resources/input_contract_cases.json (python -m tests.unit.test_input_contract)");
            cases = new ObjectMapper().readTree(in);
        }
        assertTrue(cases.size() > 50, "the table has its cases");
        UsageEventDecoder decoder = new UsageEventDecoder(); // one decoder for all: no reason leaks into the next record
        for (JsonNode c : cases) {
            byte[] message = Base64.getDecoder().decode(c.get("avro").asText());
            String expected = c.get("reason").isNull() ? null : c.get("reason").asText();
            GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
            assertEquals(expected, decoder.decodeInto(message, row), c.get("name").asText());
            assertEquals(expected == null, row.getField(0) != null, c.get("name").asText());
        }
    }

    @Test
    void idsAtTheirLimitAreKeptAndOneBytePastRefused() {
        for (int i = 0; i < IDS.length; i++) {
            int limit = LIMITS[i];
            assertNull(reason(with(IDS[i], repeat("a", limit))), IDS[i]);
            assertNull(reason(with(IDS[i], repeat("é", limit / 2))), IDS[i] + " in 2-byte characters");
            assertNull(reason(with(IDS[i], repeat("😀", limit / 4))), IDS[i] + " in 4-byte characters");
            String past = "contract: " + IDS[i] + " is " + (limit + 1) + " bytes, at most " + limit;
            assertEquals(past, reason(with(IDS[i], repeat("a", limit + 1))));
            assertEquals(past, reason(with(IDS[i], repeat("é", limit / 2) + "a")));
            // An empty id is the SQL validation's "missing field", not a contract breach.
            assertNull(reason(with(IDS[i], "")), IDS[i] + " empty");
        }
        assertEquals(64, InputContract.MAX_TENANT_ID_BYTES);
        assertEquals(128, InputContract.MAX_EVENT_ID_BYTES);
    }

    @Test
    void hugeIdsAreRefusedWithAShortReason() {
        assertEquals("contract: event_id is 3000 bytes, at most 128", reason(with("event_id", repeat("x", 3000))));
        assertEquals("contract: customer_id is 70000 bytes, at most 128", reason(with("customer_id", repeat("x", 70_000))));
        assertEquals("contract: tenant_id is 70000 bytes, at most 64", reason(with("tenant_id", repeat("\u0000", 70_000))));
        assertEquals("contract: meter is 900000 bytes, at most 64", reason(with("meter", repeat("m", 900_000))));
        assertEquals("contract: dimension 'region' is 900000 bytes, at most 128", reason(withDims(dim("region", repeat("v", 900_000)))));
    }

    @Test
    void controlCharactersInEveryIdAreRefused() {
        for (String id : IDS) {
            assertEquals("contract: " + id + " has control character U+0000 at character 3", reason(with(id, "abc\u0000")));
            assertEquals("contract: " + id + " has control character U+0085 at character 1", reason(with(id, "a\u0085")));
            assertEquals("contract: " + id + " has control character U+007F at character 0", reason(with(id, "\u007f")));
            assertEquals("contract: " + id + " has control character U+001F at character 2", reason(with(id, "é😀\u001f")));
            assertEquals("contract: " + id + " has control character U+0080 at character 4", reason(with(id, "€€€€\u0080")));
            assertEquals("contract: " + id + " has control character U+009F at character 0", reason(with(id, "\u009f")));
            // Neighbours that are not controls: U+00A0 (C2 A0), U+0100 (C4 80), and the space.
            assertNull(reason(with(id, "\u00a0\u0100 x")), id);
        }
    }

    @Test
    void sixteenDimensionsAreKeptSeventeenRefused() {
        assertNull(reason(withDims(dims(16))));
        assertEquals("contract: 17 dimensions, at most 16", reason(withDims(dims(17))));
        assertNull(reason(withDims(Map.of())));
    }

    @Test
    void dimensionKeysFromOneTo64Bytes() {
        assertNull(reason(withDims(dim(repeat("k", 64), "v"))));
        assertNull(reason(withDims(dim(repeat("ü", 32), "v"))));
        assertNull(reason(withDims(dim("k", "v"))));
        assertEquals("contract: dimension key is 65 bytes, at most 64", reason(withDims(dim(repeat("k", 65), "v"))));
        assertEquals("contract: dimension key is 65 bytes, at most 64", reason(withDims(dim(repeat("ü", 32) + "k", "v"))));
        assertEquals("contract: dimension key is 0 bytes, at least 1", reason(withDims(dim("", "v"))));
        assertEquals("contract: dimension key has control character U+0000 at character 2", reason(withDims(dim("ab\u0000", "v"))));
        assertEquals("contract: dimension key has control character U+0085 at character 0", reason(withDims(dim("\u0085", "v"))));
        assertEquals("contract: dimension key has control character U+007F at character 1", reason(withDims(dim("a\u007f", "v"))));
    }

    @Test
    void dimensionValuesUpTo128Bytes() {
        assertNull(reason(withDims(dim("region", repeat("v", 128)))));
        assertNull(reason(withDims(dim("region", repeat("ß", 64)))));
        assertNull(reason(withDims(dim("region", ""))));
        assertEquals("contract: dimension 'region' is 129 bytes, at most 128", reason(withDims(dim("region", repeat("v", 129)))));
        assertEquals("contract: dimension 'region' is 129 bytes, at most 128", reason(withDims(dim("region", repeat("ß", 64) + "v"))));
        assertEquals("contract: dimension 'region' has control character U+0000 at character 0", reason(withDims(dim("region", "\u0000"))));
        assertEquals("contract: dimension 'region' has control character U+0085 at character 2", reason(withDims(dim("region", "eu\u0085"))));
        assertEquals("contract: dimension 'region' has control character U+007F at character 3", reason(withDims(dim("region", "eu-\u007f"))));
        assertEquals("contract: dimension 'app.v2:region-id_x' has control character U+0000 at character 0",
                reason(withDims(dim("app.v2:region-id_x", "\u0000"))));
    }

    @Test
    void dimensionsAreCheckedInWireOrderAfterTheIdsAndTheCount() {
        Map<String, String> dims = new LinkedHashMap<>();
        dims.put("z", "ok");
        dims.put("b", "\u0000");
        dims.put("a", "\u0000");
        assertEquals("contract: dimension 'b' has control character U+0000 at character 0", reason(withDims(dims)));
        GenericRecord badMeter = withDims(dims);
        badMeter.put("meter", "m\u0000");
        assertEquals("contract: meter has control character U+0000 at character 1", reason(badMeter));
        Map<String, String> many = dims(16);
        many.put("bad", "\u0000");
        assertEquals("contract: 17 dimensions, at most 16", reason(withDims(many)));
        GenericRecord badBoth = withDims(dim("region", "\u0000"));
        badBoth.put("quantity", UsageEventDecoderTest.event(UsageEventDecoderTest.SCHEMA, "e", MAX.add(BigDecimal.ONE), 0, Map.of()).get("quantity"));
        assertEquals("contract: dimension 'region' has control character U+0000 at character 0", reason(badBoth));
    }

    @Test
    void quantityUpTo10To15EitherSign() {
        assertNull(reason(withQuantity(MAX)));
        assertNull(reason(withQuantity(MAX.negate())));
        assertNull(reason(withQuantity(BigDecimal.ZERO)));
        String past = "contract: |quantity| exceeds 1000000000000000";
        assertEquals(past, reason(withQuantity(MAX.add(EPSILON))));
        assertEquals(past, reason(withQuantity(MAX.add(EPSILON).negate())));
        assertEquals(past, reason(withQuantity(new BigDecimal("99999999999999999999999999999.999999999"))));
    }

    @Test
    void aMalformedRecordKeepsItsOwnReason() {
        byte[] bad = UsageEventDecoderTest.encode(with("event_id", "\u0000"));
        byte[] longer = Arrays.copyOf(bad, bad.length + 1);
        GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
        assertEquals(UsageEventDecoder.TRAILING, new UsageEventDecoder().decodeInto(longer, row));
    }

    @Test
    void aRefusedRecordLeavesNothingForTheNext() {
        UsageEventDecoder decoder = new UsageEventDecoder();
        byte[] bad = UsageEventDecoderTest.encode(withDims(dim("region", "\u0000")));
        byte[] good = UsageEventDecoderTest.encode(record());
        for (int i = 0; i < 3; i++) {
            assertNotNull(decoder.decodeInto(bad, new GenericRowData(UsageEventDecoder.ARITY)));
            assertNull(decoder.decodeInto(good, new GenericRowData(UsageEventDecoder.ARITY)));
        }
    }

    @Test
    void keysAreQuotedAsPythonsRepr() {
        assertEquals("'region'", InputContract.pythonRepr("region"));
        assertEquals("\"it's\"", InputContract.pythonRepr("it's"));
        assertEquals("'a\\'b\"c'", InputContract.pythonRepr("a'b\"c"));
        assertEquals("'a\\\\b'", InputContract.pythonRepr("a\\b"));
        assertEquals("'a\\xa0b\\u200bc\\u3000'", InputContract.pythonRepr("a\u00a0b\u200bc\u3000"));
        assertEquals("'é€😀 '", InputContract.pythonRepr("é€😀 "));
        assertEquals("'\\t\\x00\\x7f\\x85'", InputContract.pythonRepr("\t\u0000\u007f\u0085"));
        assertEquals("'\\U000f0000'", InputContract.pythonRepr(new String(Character.toChars(0xF0000))));
    }

    @Test
    void checksOfAValidEventAllocateNothing() {
        byte[] id = "évent-0123456789".getBytes(StandardCharsets.UTF_8);
        BigDecimal quantity = new BigDecimal("12.345678901");
        com.sun.management.ThreadMXBean threads = (com.sun.management.ThreadMXBean) ManagementFactory.getThreadMXBean();
        long sink = 0;
        for (int round = 0; round < 3; round++) { // the first rounds may load classes
            long before = threads.getCurrentThreadAllocatedBytes();
            for (int i = 0; i < 10_000; i++) {
                sink += InputContract.checkId(i & 3, id, 0, id.length) == null ? 1 : 0;
                sink += InputContract.checkDimensionKey(id, 0, 6) == null ? 1 : 0;
                sink += InputContract.checkDimensionValue(id, 0, 6, 6, id.length - 6) == null ? 1 : 0;
                sink += InputContract.checkDimensionCount(16) == null ? 1 : 0;
                sink += InputContract.checkQuantity(quantity) == null ? 1 : 0;
            }
            long allocated = threads.getCurrentThreadAllocatedBytes() - before;
            if (round == 2) {
                assertTrue(allocated < 1024, allocated + " bytes allocated by 50,000 checks");
            }
        }
        assertEquals(150_000, sink);
    }
}
