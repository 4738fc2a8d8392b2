package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.List;

import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.streaming.api.operators.KeyedProcessOperator;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.KeyedOneInputStreamOperatorTestHarness;
import org.apache.flink.types.Row;
import org.junit.jupiter.api.Test;

/** The closer emits each window's latest value once, at end - 1 ms + lateness, also when the row comes after that watermark. */
class WindowCloserTest {
    private static final long LATENESS_MS = 10_000;
    private static final long START = 1_700_000_000_000L;
    private static final long END = START + 10_000;
    private static final long CLOSE = END - 1 + LATENESS_MS;
    private static final long HOLD_MS = 5_000;

    private static Row update(String customer, String quantity, long revision) {
        return Row.of("t1", customer, "tokens", "", utc(START), utc(END), quantity, revision, revision);
    }

    private static LocalDateTime utc(long ms) {
        return LocalDateTime.ofInstant(Instant.ofEpochMilli(ms), ZoneOffset.UTC);
    }

    private static KeyedOneInputStreamOperatorTestHarness<String, Row, Row> harness() throws Exception {
        return harness(LATENESS_MS);
    }

    private static KeyedOneInputStreamOperatorTestHarness<String, Row, Row> harness(long latenessMs) throws Exception {
        return new KeyedOneInputStreamOperatorTestHarness<>(new KeyedProcessOperator<>(new WindowCloser(latenessMs, HOLD_MS)), WindowCloser.windowKey(), Types.STRING);
    }

    /** A savepoint of a window fired (watermark past its end) and still open under the test's 10 s lateness. */
    private static OperatorSubtaskState openWindowSavepoint() throws Exception {
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness()) {
            h.open();
            h.processElement(new StreamRecord<>(update("c1", "1", 1)));
            h.processWatermark(new Watermark(END - 1));
            h.processElement(new StreamRecord<>(update("c1", "2", 2)));
            assertEquals(List.of(), h.extractOutputValues());
            return h.snapshot(1L, 1L);
        }
    }

    @Test
    void emitsTheLatestValueOnceAtTheCloseTime() throws Exception {
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness()) {
            h.open();
            h.processElement(new StreamRecord<>(update("c1", "1", 1)));
            h.processWatermark(new Watermark(END));
            h.processElement(new StreamRecord<>(update("c1", "3", 2)));
            h.processWatermark(new Watermark(CLOSE - 1));
            assertEquals(List.of(), h.extractOutputValues(), "still within the allowed lateness");
            h.processWatermark(new Watermark(CLOSE));
            List<Row> out = h.extractOutputValues();
            assertEquals(1, out.size());
            assertEquals("3", out.get(0).getField(6));
            assertEquals(START, out.get(0).getField(4));
        }
    }

    @Test
    void aRowArrivingBehindTheWatermarkIsEmittedOnceAfterTheHoldWithItsRefires() throws Exception {
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness()) {
            h.open();
            h.setProcessingTime(1_000);
            // Another input carried the watermark past the close time while this row's input was idle.
            h.processWatermark(new Watermark(CLOSE + 60_000));
            h.processElement(new StreamRecord<>(update("c2", "2.5", 2)));
            // The window operator re-fires it within its allowed lateness: right behind, on the same channel.
            h.processElement(new StreamRecord<>(update("c2", "4.0", 3)));
            assertEquals(0, h.numEventTimeTimers(), "no timer waiting for a watermark advance that may never come");
            h.setProcessingTime(1_000 + HOLD_MS - 1);
            assertEquals(List.of(), h.extractOutputValues(), "1 ms before the hold ends");
            h.setProcessingTime(1_000 + HOLD_MS);
            List<StreamRecord<? extends Row>> out = h.extractOutputStreamRecords();
            assertEquals(1, out.size(), "one emission, not one per re-fire");
            assertEquals("4.0", out.get(0).getValue().getField(6));
            assertEquals(3L, out.get(0).getValue().getField(8));
            assertEquals(CLOSE, out.get(0).getTimestamp());
            h.setProcessingTime(1_000 + 10 * HOLD_MS);
            h.processWatermark(new Watermark(CLOSE + 600_000));
            assertEquals(1, h.extractOutputValues().size());
        }
    }

    @Test
    void aHeldWindowSurvivesARestoreAndIsEmittedOnce() throws Exception {
        OperatorSubtaskState snapshot;
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness()) {
            h.open();
            h.setProcessingTime(1_000);
            h.processWatermark(new Watermark(CLOSE + 60_000));
            h.processElement(new StreamRecord<>(update("c2", "2.5", 2)));
            snapshot = h.snapshot(1, 2_000);
        }
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness()) {
            h.initializeState(snapshot);
            h.open();
            h.setProcessingTime(1_000 + HOLD_MS);
            assertEquals(1, h.extractOutputValues().size());
            assertEquals("2.5", h.extractOutputValues().get(0).getField(6));
        }
    }

    @Test
    void raisedLatenessMovesTheRestoredTimerToTheNewCloseTime() throws Exception {
        long raised = 30_000;
        long newClose = END - 1 + raised;
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness(raised)) {
            h.initializeState(openWindowSavepoint());
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of(), h.extractOutputValues(), "the old close time: the window operator keeps it open, so does the closer");
            // An event within the raised lateness updates the window after its old close time.
            h.processElement(new StreamRecord<>(update("c1", "5", 3)));
            h.processWatermark(new Watermark(newClose - 1));
            assertEquals(List.of(), h.extractOutputValues(), "one ms before end - 1 ms + the raised lateness");
            h.processWatermark(new Watermark(newClose));
            List<StreamRecord<? extends Row>> out = h.extractOutputStreamRecords();
            assertEquals(1, out.size(), "emitted once");
            assertEquals("5", out.get(0).getValue().getField(6), "with the update the raised lateness let in");
            assertEquals(3L, out.get(0).getValue().getField(8));
            assertEquals(newClose, out.get(0).getTimestamp());
            h.processWatermark(new Watermark(newClose + 100_000));
            assertEquals(1, h.extractOutputValues().size());
        }
    }

    @Test
    void loweredLatenessEmitsTheWindowWithWhatItCounted() throws Exception {
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness(0)) {
            h.initializeState(openWindowSavepoint());
            h.open();
            // Closed under 0 s at END - 1 (the restored watermark); no update can come (the classifier routes them late).
            h.processWatermark(new Watermark(END - 1));
            h.processWatermark(new Watermark(CLOSE - 1));
            h.processWatermark(new Watermark(CLOSE));
            List<Row> out = h.extractOutputValues();
            assertEquals(1, out.size(), "emitted once, at the latest at the close time it was registered with");
            assertEquals("2", out.get(0).getField(6));
            h.processWatermark(new Watermark(CLOSE + 100_000));
            assertEquals(1, h.extractOutputValues().size());
        }
    }

    @Test
    void loweredLatenessAndANewWindowClosesAtTheNewCloseTime() throws Exception {
        long lowered = 2_000;
        try (KeyedOneInputStreamOperatorTestHarness<String, Row, Row> h = harness(lowered)) {
            h.open();
            h.processElement(new StreamRecord<>(update("c3", "1", 1)));
            h.processWatermark(new Watermark(END - 1 + lowered - 1));
            assertEquals(List.of(), h.extractOutputValues());
            h.processWatermark(new Watermark(END - 1 + lowered));
            assertEquals(1, h.extractOutputValues().size());
        }
    }
}
