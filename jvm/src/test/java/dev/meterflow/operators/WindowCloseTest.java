package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.InputStream;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.junit.jupiter.api.Test;

/**
 * The lateness rule across config changes agrees with its Python twin (meterflow.windowing.is_late_after)
 * on the shared case table, which tests/unit/test_windowing.py writes to lateness_rule_cases.json.
 */
class WindowCloseTest {
    @Test
    void theSharedCaseTable() throws Exception {
        JsonNode cases;
        try (InputStream in = WindowCloseTest.class.getResourceAsStream("/lateness_rule_cases.json")) {
            assertNotNull(in, "lateness_rule_cases.json on the test classpath");
            cases = new ObjectMapper().readTree(in);
        }
        assertTrue(cases.size() >= 10);
        for (JsonNode c : cases) {
            // The classifier's fold: the held watermark is the highest seen, the boundary follows it under the lateness in force.
            long held = WindowClose.NO_WATERMARK;
            long closed = WindowClose.NOTHING_CLOSED;
            long lateness = 0;
            for (JsonNode step : c.get("history")) {
                lateness = step.get("allowed_lateness_ms").asLong();
                if (!step.get("watermark_ms").isNull()) {
                    held = Math.max(held, step.get("watermark_ms").asLong());
                }
                closed = WindowClose.closedThrough(closed, held, lateness);
            }
            boolean late = WindowClose.isLate(c.get("window_end_ms").asLong(), lateness, held, closed);
            assertEquals(c.get("late").asBoolean(), late, c.get("name").asText());
        }
    }

    @Test
    void closedThroughIsTheHighestEndClosed() {
        assertEquals(WindowClose.NOTHING_CLOSED, WindowClose.closedThrough(WindowClose.NOTHING_CLOSED, WindowClose.NO_WATERMARK, 10_000));
        assertEquals(20_000, WindowClose.closedThrough(WindowClose.NOTHING_CLOSED, 29_999, 10_000));
        assertTrue(WindowClose.isLate(20_000, 10_000, 29_999) && !WindowClose.isLate(20_001, 10_000, 29_999));
        assertEquals(20_000, WindowClose.closedThrough(20_000, 29_999, 30_000), "a raised lateness never lowers it");
        assertEquals(Long.MAX_VALUE, WindowClose.closedThrough(20_000, Long.MAX_VALUE, 0), "the end-of-input watermark closes everything, without overflow");
        assertEquals(Long.MAX_VALUE - 9_999, WindowClose.closedThrough(20_000, Long.MAX_VALUE, 10_000));
    }
}
