package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.junit.jupiter.api.Test;

/** The meters' rules the format applies in the source: the reasons, their order, and the group-by key's bytes. */
class EventRulesTest {

    static final String METERS = "{\"tokens\":{\"allow_negative\":false,\"group_by\":[\"region\",\"model\"]},"
            + "\"credits\":{\"allow_negative\":true,\"group_by\":[]}}";

    /** A decoded row as the format's decoder leaves it: strings are slices of the message's bytes. */
    static GenericRowData row(String eventId, String tenant, String customer, String meter, String quantity, Map<String, String> dims) {
        Map<StringData, StringData> map = new HashMap<>();
        dims.forEach((k, v) -> map.put(bytes(k), bytes(v)));
        return GenericRowData.of(bytes(eventId), bytes(tenant), bytes(customer), bytes(meter),
                DecimalData.fromBigDecimal(new BigDecimal(quantity), 38, 9), TimestampData.fromEpochMillis(0), new GenericMapData(map));
    }

    static StringData bytes(String s) {
        byte[] utf8 = s.getBytes(StandardCharsets.UTF_8);
        byte[] padded = new byte[utf8.length + 4];
        System.arraycopy(utf8, 0, padded, 2, utf8.length);
        return StringData.fromBytes(padded, 2, utf8.length);
    }

    static GenericRowData row(String meter, String quantity) {
        return row("e1", "t1", "c1", meter, quantity, Map.of("region", "eu"));
    }

    @Test
    void aGoodEventHasNoReason() {
        EventRules rules = EventRules.parse(METERS);
        assertNull(rules.reject(row("tokens", "1.5")));
        assertNull(rules.reject(row("tokens", "0")));
        assertNull(rules.reject(row("credits", "-3")), "credits allow a negative quantity");
    }

    @Test
    void blankIdsAreMissingFieldsInTheSchemasOrder() {
        EventRules rules = EventRules.parse(METERS);
        assertEquals("missing field: event_id", rules.reject(row("", "t1", "c1", "tokens", "1", Map.of())));
        assertEquals("missing field: event_id", rules.reject(row("   ", "", "c1", "tokens", "1", Map.of())), "the first blank id");
        assertEquals("missing field: tenant_id", rules.reject(row("e1", " ", "c1", "tokens", "1", Map.of())));
        assertEquals("missing field: customer_id", rules.reject(row("e1", "t1", "", "tokens", "1", Map.of())));
        assertEquals("missing field: meter", rules.reject(row("e1", "t1", "c1", "  ", "1", Map.of())), "before the unknown meter");
        // Only spaces are blank, as SQL's TRIM: a no-break space is an id.
        assertEquals("unknown meter: \u00a0", rules.reject(row("\u00a0", "t1", "c1", "\u00a0", "1", Map.of())));
        assertNull(rules.reject(row(" e1 ", "t1", "c1", "tokens", "1", Map.of())));
    }

    @Test
    void anUnknownMeterThenAForbiddenNegative() {
        EventRules rules = EventRules.parse(METERS);
        assertEquals("unknown meter: gpu_hours", rules.reject(row("gpu_hours", "-1")), "unknown before negative");
        assertEquals("unknown meter: Tokens", rules.reject(row("Tokens", "1")), "names are exact");
        assertEquals("unknown meter: 模型", rules.reject(row("模型", "1")));
        assertEquals("negative quantity: meter tokens does not allow it", rules.reject(row("tokens", "-0.000000001")));
    }

    @Test
    void theGroupByKeyHasTheBytesPythonBuilds() throws Exception {
        JsonNode cases;
        try (InputStream in = EventRulesTest.class.getResourceAsStream("/dimensions_key_cases.json")) {
            assertNotNull(in, "jvm/src/test/resources/dimensions_key_cases.json (python -m tests.unit.test_dimensions_key_cases)");
            cases = new ObjectMapper().readTree(in);
        }
        assertTrue(cases.size() >= 10);
        for (JsonNode c : cases) {
            List<String> groupBy = new ArrayList<>();
            c.get("group_by").forEach(d -> groupBy.add(d.asText()));
            Map<String, String> dims = new HashMap<>();
            c.get("dimensions").properties().forEach(e -> dims.put(e.getKey(), e.getValue().asText()));
            EventRules rules = new EventRules(Map.of("m", new EventRules.Meter(false, groupBy)));
            StringData key = rules.dimensionsKey(row("e1", "t1", "c1", "m", "1", dims));
            assertArrayEquals(c.get("key").asText().getBytes(StandardCharsets.UTF_8), key.toBytes(), c.toString());
        }
    }

    @Test
    void aMeterWithoutGroupByOrNotConfiguredHasTheEmptyKey() {
        EventRules rules = EventRules.parse(METERS);
        assertEquals("{}", rules.dimensionsKey(row("credits", "1")).toString());
        assertEquals("{}", rules.dimensionsKey(row("gpu_hours", "1")).toString());
        assertEquals("{\"model\":\"\",\"region\":\"eu\"}", rules.dimensionsKey(row("tokens", "1")).toString());
    }

    @Test
    void theOptionIsCheckedAtPlanning() {
        for (String bad : List.of("", "[]", "{}", "{\"m\":{}}", "{\"m\":{\"allow_negative\":\"no\",\"group_by\":[]}}",
                "{\"m\":{\"allow_negative\":false,\"group_by\":\"region\"}}", "{\"m\":{\"allow_negative\":false,\"group_by\":[\"a\\\"b\"]}}",
                "{\"m\":{\"allow_negative\":false,\"group_by\":[\"\"]}}")) {
            ValidationException e = assertThrows(ValidationException.class, () -> EventRules.parse(bad), bad);
            assertTrue(e.getMessage().contains("'meters'") || e.getMessage().contains("group-by dimension"), e.getMessage());
        }
    }

    @Test
    void theRulesTravelWithTheDecoder() throws Exception {
        EventRules rules = EventRules.parse(METERS);
        rules.reject(row("tokens", "1"));
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        try (ObjectOutputStream o = new ObjectOutputStream(out)) {
            o.writeObject(rules);
        }
        EventRules copy;
        try (ObjectInputStream in = new ObjectInputStream(new ByteArrayInputStream(out.toByteArray()))) {
            copy = (EventRules) in.readObject();
        }
        assertEquals(rules, copy);
        assertEquals("negative quantity: meter tokens does not allow it", copy.reject(row("tokens", "-1")));
        assertEquals("{\"model\":\"\",\"region\":\"eu\"}", copy.dimensionsKey(row("tokens", "1")).toString());
    }
}
