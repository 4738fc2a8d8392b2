package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.math.BigDecimal;
import java.util.Map;

import org.junit.jupiter.api.Test;

class AvroEventTimeAssignerTest {

    @Test
    void aUsageEventIsStampedWithItsEventTimeNotTheRecordTimestamp() {
        byte[] message = UsageEventDecoderTest.encode(UsageEventDecoderTest.event(UsageEventDecoderTest.SCHEMA, "e1", new BigDecimal("1.5"), 1_700_000_123_456L, Map.of()));
        AvroEventTimeAssigner assigner = new AvroEventTimeAssigner();
        assertEquals(1_700_000_123_456L, assigner.extractTimestamp(message, 42L));
        // Reused: a second record gets its own time.
        byte[] other = UsageEventDecoderTest.encode(UsageEventDecoderTest.event(UsageEventDecoderTest.SCHEMA, "e2", BigDecimal.ONE, 5L, Map.of()));
        assertEquals(5L, assigner.extractTimestamp(other, 42L));
    }

    @Test
    void aMalformedRecordKeepsItsRecordTimestamp() {
        AvroEventTimeAssigner assigner = new AvroEventTimeAssigner();
        assertEquals(42L, assigner.extractTimestamp(new byte[] {1, 2, 3}, 42L));
        assertEquals(43L, assigner.extractTimestamp(new byte[0], 43L));
    }
}
