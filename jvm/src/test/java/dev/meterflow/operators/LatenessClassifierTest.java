package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;

import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.AbstractStreamOperatorTestHarness;
import org.apache.flink.streaming.util.OneInputStreamOperatorTestHarness;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.TimestampData;
import org.junit.jupiter.api.Test;

/** The late decision at the exact boundary, and across a snapshot and restore in the middle of late data. */
class LatenessClassifierTest {
    private static final long LATENESS_MS = 10_000;
    private static final long WINDOW_END = 1_700_000_010_000L;
    private static final long CLOSE = WINDOW_END - 1 + LATENESS_MS;

    // Routed row as the job lays it out, reduced to what the classifier reads: event_time, window_end, an id.
    // The output appends watermark (3), lateness_ms (4), is_late (5).
    private static RowData event(long eventMs, long windowEndMs) {
        return GenericRowData.of(utc(eventMs), utc(windowEndMs), 7L);
    }

    private static TimestampData utc(long ms) {
        return TimestampData.fromEpochMillis(ms);
    }

    private static OneInputStreamOperatorTestHarness<RowData, RowData> harness() throws Exception {
        return harness(LATENESS_MS);
    }

    private static OneInputStreamOperatorTestHarness<RowData, RowData> harness(long latenessMs) throws Exception {
        return new OneInputStreamOperatorTestHarness<>(new LatenessClassifier(0, 1, latenessMs));
    }

    /** A snapshot taken with the watermark at {@code watermarkMs} under the test's 10 s lateness. */
    private static OperatorSubtaskState stoppedAt(long watermarkMs) throws Exception {
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(watermarkMs));
            return h.snapshot(1L, 1L);
        }
    }

    private static Boolean classify(OneInputStreamOperatorTestHarness<RowData, RowData> h, long eventMs, long windowEndMs) throws Exception {
        int before = h.extractOutputValues().size();
        h.processElement(new StreamRecord<>(event(eventMs, windowEndMs), eventMs));
        List<RowData> out = h.extractOutputValues();
        assertEquals(before + 1, out.size());
        RowData row = out.get(out.size() - 1);
        assertEquals(6, row.getArity());
        assertEquals(7L, row.getLong(2), "the input's columns come first, unchanged");
        return row.isNullAt(5) ? null : row.getBoolean(5);
    }

    @Test
    void boundaryIsTheWindowOperatorsCleanupTime() throws Exception {
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            assertEquals(false, classify(h, WINDOW_END - 5_000, WINDOW_END), "no watermark yet: on time");
            h.processWatermark(new Watermark(CLOSE - 1));
            assertEquals(false, classify(h, WINDOW_END - 1, WINDOW_END), "watermark one ms before end - 1 ms + lateness");
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END), "watermark exactly at end - 1 ms + lateness");
            RowData late = h.extractOutputValues().get(2);
            assertEquals(utc(CLOSE), late.getTimestamp(3, 3));
            assertEquals(CLOSE - (WINDOW_END - 1), late.getLong(4));
            assertEquals(false, classify(h, WINDOW_END, WINDOW_END + 10_000), "the next window is open");
        }
    }

    @Test
    void restoredWatermarkKeepsPurgedWindowsLate() throws Exception {
        OperatorSubtaskState snapshot;
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE + 500));
            assertEquals(true, classify(h, WINDOW_END - 3_000, WINDOW_END));
            snapshot = h.snapshot(1L, 1L);
        }
        // After a restore Flink starts again without a watermark; the held one still decides.
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
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
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE - 100));
            low = h.snapshot(1L, 1L);
        }
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            high = h.snapshot(1L, 1L);
        }
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.initializeState(AbstractStreamOperatorTestHarness.repackageState(low, high));
            h.open();
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END));
        }
    }

    @Test
    void rejectedRowsPassUnchanged() throws Exception {
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            h.processElement(new StreamRecord<>(GenericRowData.of(null, null, 7L), 0L));
            RowData out = h.extractOutputValues().get(0);
            assertEquals(7L, out.getLong(2));
            assertTrue(out.isNullAt(3) && out.isNullAt(4) && out.isNullAt(5));
        }
    }

    @Test
    void raisedLatenessKeepsWindowsClosedBeforeTheSavepointClosed() throws Exception {
        // Stopped with the watermark exactly at the window's close under 10 s: final row written, window purged.
        OperatorSubtaskState savepoint = stoppedAt(CLOSE);
        long raised = 30_000;
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness(raised)) {
            h.initializeState(savepoint);
            h.open();
            assertEquals(WINDOW_END, ((LatenessClassifier) h.getOperator()).closedThrough(), "closed through the window's end, exactly");
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END), "closed before: late, although open under 30 s");
            assertEquals(true, classify(h, WINDOW_END - 15_000, WINDOW_END - 10_000), "an older window too");
            long next = WINDOW_END + 10_000;
            assertEquals(false, classify(h, next - 1, next), "a window open before stays open");
            h.processWatermark(new Watermark(next - 1 + 10_000));
            assertEquals(false, classify(h, next - 1, next), "past its old close time, open under the raised lateness");
            h.processWatermark(new Watermark(next - 1 + raised - 1));
            assertEquals(false, classify(h, next - 1, next), "one ms before end - 1 ms + the raised lateness");
            h.processWatermark(new Watermark(next - 1 + raised));
            assertEquals(true, classify(h, next - 1, next), "exactly at end - 1 ms + the raised lateness");
            savepoint = h.snapshot(2L, 2L);
        }
        // Back to 10 s: nothing reopens, the later windows close under 10 s again.
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.initializeState(savepoint);
            h.open();
            assertEquals(true, classify(h, WINDOW_END + 9_999, WINDOW_END + 10_000));
            long later = WINDOW_END + raised; // held watermark - 10 s + 1 ms: closed under 10 s, exactly
            assertEquals(true, classify(h, later - 1, later));
            assertEquals(false, classify(h, later, later + 10_000));
        }
    }

    @Test
    void raisedLatenessOneMsShortOfTheCloseReopensNothingThatWasClosed() throws Exception {
        OperatorSubtaskState savepoint = stoppedAt(CLOSE - 1);
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness(30_000)) {
            h.initializeState(savepoint);
            h.open();
            assertEquals(false, classify(h, WINDOW_END - 1, WINDOW_END), "open before the savepoint: open after it");
            assertEquals(true, classify(h, WINDOW_END - 10_000, WINDOW_END - 10_000 + 1 - 1), "closed before: late");
        }
    }

    @Test
    void loweredLatenessClosesWindowsAtOnceFromTheBoundary() throws Exception {
        long next = WINDOW_END + 10_000;
        // Stopped with the next window fired and open under 10 s; 0 s closes it exactly at the held watermark.
        OperatorSubtaskState savepoint = stoppedAt(next - 1);
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness(0)) {
            h.initializeState(savepoint);
            h.open();
            assertEquals(true, classify(h, next - 1, next), "end - 1 ms + 0 exactly at the held watermark: late");
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END), "an older window: late");
            assertEquals(false, classify(h, next, next + 10_000), "the window after it is open");
            RowData boundary = h.extractOutputValues().get(0);
            assertEquals(utc(next - 1), boundary.getTimestamp(3, 3));
        }
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness(0)) {
            h.initializeState(stoppedAt(next - 2));
            h.open();
            assertEquals(false, classify(h, next - 1, next), "one ms before the new boundary: on time");
        }
    }

    /** The operator state of the previous version: the held watermark only. */
    private static final class HeldOnly extends org.apache.flink.streaming.api.operators.AbstractStreamOperator<RowData>
            implements org.apache.flink.streaming.api.operators.OneInputStreamOperator<RowData, RowData> {
        private static final long serialVersionUID = 1L;

        @Override
        public void initializeState(org.apache.flink.runtime.state.StateInitializationContext context) throws Exception {
            super.initializeState(context);
            context.getOperatorStateStore().getUnionListState(new org.apache.flink.api.common.state.ListStateDescriptor<>("held-watermark", org.apache.flink.api.common.typeinfo.Types.LONG)).update(List.of(CLOSE));
        }

        @Override
        public void processElement(StreamRecord<RowData> element) {}
    }

    @Test
    void aSavepointWithoutTheBoundaryRestores() throws Exception {
        OperatorSubtaskState heldOnly;
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = new OneInputStreamOperatorTestHarness<>(new HeldOnly())) {
            h.open();
            heldOnly = h.snapshot(1L, 1L);
        }
        try (OneInputStreamOperatorTestHarness<RowData, RowData> h = harness()) {
            h.initializeState(heldOnly);
            h.open();
            assertEquals(WINDOW_END, ((LatenessClassifier) h.getOperator()).closedThrough(), "from the held watermark under the lateness in force");
            assertEquals(true, classify(h, WINDOW_END - 1, WINDOW_END));
            assertEquals(false, classify(h, WINDOW_END, WINDOW_END + 10_000));
        }
    }
}
