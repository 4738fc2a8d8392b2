package dev.meterflow.udf;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;

import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.List;

import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.AbstractStreamOperatorTestHarness;
import org.apache.flink.streaming.util.OneInputStreamOperatorTestHarness;
import org.apache.flink.types.Row;
import org.junit.jupiter.api.Test;

/** The late decision at the exact boundary, and across a snapshot and restore in the middle of late data. */
class LatenessClassifierTest {
    private static final long LATENESS_MS = 10_000;
    private static final long WINDOW_END = 1_700_000_010_000L;
    private static final long CLOSE = WINDOW_END - 1 + LATENESS_MS;

    // Routed row as the job lays it out, reduced to what the classifier reads and writes.
    private static Row event(long eventMs, long windowEndMs) {
        return Row.of(utc(eventMs), utc(windowEndMs), null, null, null);
    }

    private static LocalDateTime utc(long ms) {
        return LocalDateTime.ofInstant(Instant.ofEpochMilli(ms), ZoneOffset.UTC);
    }

    private static OneInputStreamOperatorTestHarness<Row, Row> harness() throws Exception {
        return new OneInputStreamOperatorTestHarness<>(new LatenessClassifier(0, 1, 2, 3, 4, LATENESS_MS));
    }

    private static Boolean classify(OneInputStreamOperatorTestHarness<Row, Row> h, long eventMs, long windowEndMs) throws Exception {
        int before = h.extractOutputValues().size();
        h.processElement(new StreamRecord<>(event(eventMs, windowEndMs), eventMs));
        List<Row> out = h.extractOutputValues();
        assertEquals(before + 1, out.size());
        return (Boolean) out.get(out.size() - 1).getField(4);
    }

    @Test
    void boundaryIsTheWindowOperatorsCleanupTime() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.open();
            assertEquals(false, classify(h, WINDOW_END - 5_000, WINDOW_END), "no watermark yet: on time");
            h.processWatermark(new Watermark(CLOSE - 1));
            assertEquals(false, classify(h, WINDOW_END - 1, WINDOW_END), "watermark one ms before end - 1 ms + lateness");
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END), "watermark exactly at end - 1 ms + lateness");
            Row late = h.extractOutputValues().get(2);
            assertEquals(utc(CLOSE), late.getField(2));
            assertEquals(CLOSE - (WINDOW_END - 1), late.getField(3));
            assertEquals(false, classify(h, WINDOW_END, WINDOW_END + 10_000), "the next window is open");
        }
    }

    @Test
    void restoredWatermarkKeepsPurgedWindowsLate() throws Exception {
        OperatorSubtaskState snapshot;
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE + 500));
            assertEquals(true, classify(h, WINDOW_END - 3_000, WINDOW_END));
            snapshot = h.snapshot(1L, 1L);
        }
        // After a restore Flink starts again without a watermark; the held one still decides.
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.initializeState(snapshot);
            h.open();
            assertEquals(true, classify(h, WINDOW_END - 3_000, WINDOW_END), "replayed late event stays late");
            assertEquals(true, classify(h, WINDOW_END - 9_999, WINDOW_END), "a new late event of the purged window is late");
            assertEquals(false, classify(h, WINDOW_END + 5_000, WINDOW_END + 10_000), "the open window still accepts");
            h.processWatermark(new Watermark(0));
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END), "a live watermark below the held one changes nothing");
            assertEquals(new Watermark(CLOSE + 500), h.getOutput().stream().filter(o -> o instanceof Watermark).findFirst().orElse(null),
                    "the first watermark after the restore carries the held one downstream");
        }
    }

    @Test
    void rescaledRestoreTakesTheHighestHeldWatermark() throws Exception {
        OperatorSubtaskState low;
        OperatorSubtaskState high;
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE - 100));
            low = h.snapshot(1L, 1L);
        }
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            high = h.snapshot(1L, 1L);
        }
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.initializeState(AbstractStreamOperatorTestHarness.repackageState(low, high));
            h.open();
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END));
        }
    }

    @Test
    void rejectedRowsPassUnchanged() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            h.processElement(new StreamRecord<>(Row.of(null, null, null, null, null), 0L));
            assertNull(h.extractOutputValues().get(0).getField(4));
        }
    }
}
