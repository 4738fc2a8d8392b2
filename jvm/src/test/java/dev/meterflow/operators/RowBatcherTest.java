package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.util.ArrayList;
import java.util.List;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.OneInputStreamOperatorTestHarness;
import org.apache.flink.types.Row;
import org.junit.jupiter.api.Test;

class RowBatcherTest {
    private static final TypeInformation<Row> ROW = Types.ROW_NAMED(new String[] {"billing_key", "n"}, Types.STRING, Types.LONG);

    private static OneInputStreamOperatorTestHarness<Row, Row> harness(int maxRows, long maxDelayMs) throws Exception {
        OneInputStreamOperatorTestHarness<Row, Row> h = new OneInputStreamOperatorTestHarness<>(new RowBatcher(maxRows, maxDelayMs));
        h.setup(RowBatcher.outputType(ROW).createSerializer(h.getExecutionConfig().getSerializerConfig()));
        h.open();
        return h;
    }

    private static Row row(long n) {
        return Row.of("k" + n % 3, n);
    }

    /** The rows of each batch emitted so far (watermarks skipped), as their numbers. */
    private static List<List<Long>> batches(OneInputStreamOperatorTestHarness<Row, Row> h) {
        List<List<Long>> out = new ArrayList<>();
        for (Object element : h.getOutput()) {
            if (element instanceof StreamRecord<?> record) {
                List<Long> batch = new ArrayList<>();
                for (Row r : (Row[]) ((Row) record.getValue()).getField(0)) {
                    batch.add((Long) r.getField(1));
                }
                out.add(batch);
            }
        }
        return out;
    }

    @Test
    void aFullBatchGoesAtOnceInArrivalOrder() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness(3, 1_000)) {
            for (long n = 1; n <= 7; n++) {
                h.processElement(new StreamRecord<>(row(n)));
            }
            assertEquals(List.of(List.of(1L, 2L, 3L), List.of(4L, 5L, 6L)), batches(h));
        }
    }

    @Test
    void aPartBatchGoesWhenItsFirstRowHasWaitedMaxDelay() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness(64, 20)) {
            h.setProcessingTime(100);
            h.processElement(new StreamRecord<>(row(1)));
            h.setProcessingTime(110);
            h.processElement(new StreamRecord<>(row(2)));
            h.setProcessingTime(119);
            assertEquals(List.of(), batches(h));
            h.setProcessingTime(120);
            assertEquals(List.of(List.of(1L, 2L)), batches(h));
            h.processElement(new StreamRecord<>(row(3)));
            h.setProcessingTime(140);
            assertEquals(List.of(List.of(1L, 2L), List.of(3L)), batches(h));
        }
    }

    @Test
    void nothingIsHeldAcrossACheckpointBarrier() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness(64, 60_000)) {
            h.processElement(new StreamRecord<>(row(1)));
            h.processElement(new StreamRecord<>(row(2)));
            h.prepareSnapshotPreBarrier(1);
            assertEquals(List.of(List.of(1L, 2L)), batches(h));
            h.prepareSnapshotPreBarrier(2);
            assertEquals(1, batches(h).size(), "an empty batch is never emitted");
        }
    }

    @Test
    void aWatermarkFollowsTheRowsBeforeIt() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness(64, 60_000)) {
            h.processElement(new StreamRecord<>(row(1)));
            h.processWatermark(new Watermark(5_000));
            Object[] output = h.getOutput().toArray();
            assertEquals(2, output.length);
            assertEquals(new Watermark(5_000), output[1]);
            assertArrayEquals(new Row[] {row(1)}, (Row[]) ((Row) ((StreamRecord<?>) output[0]).getValue()).getField(0));
        }
    }

    @Test
    void theLastRowsGoWhenTheInputEnds() throws Exception {
        try (OneInputStreamOperatorTestHarness<Row, Row> h = harness(64, 60_000)) {
            h.processElement(new StreamRecord<>(row(1)));
            h.endInput();
            h.getOneInputOperator().finish();
            assertEquals(List.of(List.of(1L)), batches(h));
        }
    }

    @Test
    void aBatchHoldsARowAndWaitsNoNegativeTime() {
        assertThrows(IllegalArgumentException.class, () -> new RowBatcher(0, 10));
        assertThrows(IllegalArgumentException.class, () -> new RowBatcher(1, -1));
    }
}
