package dev.meterflow.stages;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;

import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.List;

import dev.meterflow.stages.WindowPartial.Aggregation;

import org.apache.flink.api.common.serialization.SerializerConfigImpl;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.typeutils.PojoTypeInfo;
import org.apache.flink.core.memory.DataInputDeserializer;
import org.apache.flink.core.memory.DataOutputSerializer;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.streaming.api.operators.KeyedProcessOperator;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.KeyedOneInputStreamOperatorTestHarness;
import org.apache.flink.types.Row;
import org.junit.jupiter.api.Test;

/** The second stage: first fire, re-fires within the lateness, the final row once, restores and a raised lateness. */
class WindowMergerTest {
    private static final long W0 = 1_700_000_040_000L;
    private static final long END = W0 + 60_000;
    private static final long LATENESS = 10_000;
    private static final long CLOSE = END - 1 + LATENESS;
    private static final long HOLD_MS = 5_000;
    private static final long RETAIN_MS = 600_000;
    private static final WindowKey KEY = new WindowKey("t", "c", "api_calls", "{}", W0, END);

    private static KeyedOneInputStreamOperatorTestHarness<String, PartialWindow, Row> harness(long latenessMs) throws Exception {
        return new KeyedOneInputStreamOperatorTestHarness<>(new KeyedProcessOperator<>(new WindowMerger(latenessMs, HOLD_MS, RETAIN_MS)), WindowKey.selector(), Types.STRING);
    }

    private static PartialWindow partial(String... quantities) {
        WindowPartial p = new WindowPartial(Aggregation.SUM);
        int i = 0;
        for (String q : quantities) {
            p.add(new BigDecimal(q), W0, "e" + i++, null);
        }
        return new PartialWindow(KEY, p);
    }

    /** Fires as "quantity/revision", in order, then finals as "final quantity/revision", in order. */
    private static List<String> rows(KeyedOneInputStreamOperatorTestHarness<String, PartialWindow, Row> h) {
        List<String> out = new ArrayList<>();
        var fires = h.getSideOutput(WindowMerger.FIRES);
        if (fires != null) {
            for (StreamRecord<Row> r : fires) {
                out.add(new BigDecimal((String) r.getValue().getField(6)).stripTrailingZeros().toPlainString() + "/" + r.getValue().getField(8));
            }
        }
        for (Row r : h.extractOutputValues()) {
            out.add("final " + new BigDecimal((String) r.getField(6)).stripTrailingZeros().toPlainString() + "/" + r.getField(8));
        }
        return out;
    }

    @Test
    void withEarlyRowsEachPartialBeforeTheFireIsAProvisionalRow() throws Exception {
        var merger = new KeyedProcessOperator<>(new WindowMerger(LATENESS, HOLD_MS, RETAIN_MS, true));
        try (var h = new KeyedOneInputStreamOperatorTestHarness<>(merger, WindowKey.selector(), Types.STRING)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("1")));
            h.processElement(new StreamRecord<>(partial("2")));
            assertEquals(List.of("1/1", "3/2"), rows(h), "the running value, before the window's end");
            h.processWatermark(new Watermark(END - 1));
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of("1/1", "3/2", "3/2", "final 3/2"), rows(h), "then the fire and the final as without");
        }
    }

    @Test
    void firesAtTheEndRefiresWithinTheLatenessAndClosesOnce() throws Exception {
        try (var h = harness(LATENESS)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("1", "2")));
            h.processElement(new StreamRecord<>(partial("0.5"))); // another first-stage subtask's partial
            h.processWatermark(new Watermark(END - 2));
            assertEquals(List.of(), rows(h));
            h.processWatermark(new Watermark(END - 1));
            assertEquals(List.of("3.5/3"), rows(h));
            h.processElement(new StreamRecord<>(partial("4"))); // within the lateness
            assertEquals(List.of("3.5/3", "7.5/4"), rows(h));
            h.processWatermark(new Watermark(CLOSE - 1));
            assertEquals(2, rows(h).size());
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of("3.5/3", "7.5/4", "final 7.5/4"), rows(h));
            h.processWatermark(new Watermark(CLOSE + 60_000));
            assertEquals(3, rows(h).size(), "closed once");
            h.setProcessingTime(RETAIN_MS);
            assertEquals(0, h.numKeyedStateEntries(), "its state gone after the retention");
        }
    }

    @Test
    void withoutLatenessAWindowFiresAndClosesAtOnce() throws Exception {
        try (var h = harness(0)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("2")));
            h.processWatermark(new Watermark(END - 1));
            assertEquals(List.of("2/1", "final 2/1"), rows(h));
        }
    }

    @Test
    void aWindowFirstSeenWithinItsLatenessFiresOnceThenCloses() throws Exception {
        try (var h = harness(LATENESS)) {
            h.open();
            h.processWatermark(new Watermark(END + 100));
            h.processElement(new StreamRecord<>(partial("3")));
            h.processWatermark(new Watermark(END + 200));
            assertEquals(List.of("3/1"), rows(h), "no second first fire from a timer in the past");
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of("3/1", "final 3/1"), rows(h));
        }
    }

    @Test
    void aWindowFirstSeenAfterItsCloseIsHeldThenFinal() throws Exception {
        try (var h = harness(LATENESS)) {
            h.open();
            h.setProcessingTime(1_000);
            h.processWatermark(new Watermark(CLOSE + 30_000)); // the other inputs carried it on
            h.processElement(new StreamRecord<>(partial("1")));
            h.processElement(new StreamRecord<>(partial("2"))); // what follows it on the same channel
            h.setProcessingTime(1_000 + HOLD_MS - 1);
            assertEquals(List.of(), rows(h));
            h.setProcessingTime(1_000 + HOLD_MS);
            assertEquals(List.of("final 3/2"), rows(h));
            assertEquals(CLOSE, h.extractOutputStreamRecords().get(0).getTimestamp(), "stamped with its close time, not the wall clock");
        }
    }

    @Test
    void aPartialAfterTheFinalMakesANewFinalWithEveryEvent() throws Exception {
        try (var h = harness(LATENESS)) {
            h.open();
            h.setProcessingTime(1_000);
            h.processElement(new StreamRecord<>(partial("1", "2")));
            h.processWatermark(new Watermark(CLOSE + 30_000));
            assertEquals(List.of("3/2", "final 3/2"), rows(h));
            // A first-stage subtask whose input was idle hands over its partial now.
            h.processElement(new StreamRecord<>(partial("4")));
            h.setProcessingTime(1_000 + HOLD_MS);
            assertEquals(List.of("3/2", "final 3/2", "final 7/3"), rows(h), "the whole window again, a higher revision");
            Object last = h.getOutput().toArray()[h.getOutput().size() - 1];
            assertEquals(CLOSE, ((StreamRecord<?>) last).getTimestamp(), "stamped with its close time");
        }
    }

    @Test
    void aRestoreInTheMiddleOfLateDataClosesWithEveryPartial() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(LATENESS)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("1")));
            h.processWatermark(new Watermark(END));
            h.processElement(new StreamRecord<>(partial("2")));
            snapshot = h.snapshot(1, 1);
        }
        try (var h = harness(LATENESS)) {
            h.initializeState(snapshot);
            h.open();
            h.processElement(new StreamRecord<>(partial("4"))); // no watermark yet after the restore: merged
            h.processWatermark(new Watermark(END + 1)); // the first watermark after the restore: a re-fire with it
            assertEquals(List.of("7/3"), rows(h));
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of("7/3", "final 7/3"), rows(h));
        }
    }

    @Test
    void aRaisedLatenessKeepsARestoredWindowOpenUntilItsNewClose() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(0)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("1")));
            h.processWatermark(new Watermark(END - 2));
            snapshot = h.snapshot(1, 1);
        }
        try (var h = harness(LATENESS)) {
            h.initializeState(snapshot);
            h.open();
            h.processWatermark(new Watermark(END - 1));
            assertEquals(List.of("1/1"), rows(h), "fired, not closed: the lateness is 10 s now");
            h.processElement(new StreamRecord<>(partial("5")));
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(List.of("1/1", "6/2", "final 6/2"), rows(h));
        }
    }

    @Test
    void aLoweredLatenessClosesARestoredWindowAtItsNewClose() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(LATENESS)) {
            h.open();
            h.processElement(new StreamRecord<>(partial("1")));
            snapshot = h.snapshot(1, 1);
        }
        try (var h = harness(2_000)) {
            h.initializeState(snapshot);
            h.open();
            h.processWatermark(new Watermark(END - 1 + 2_000));
            assertEquals(List.of("1/1", "final 1/1"), rows(h));
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(2, rows(h).size());
        }
    }

    @Test
    void partialsCrossBetweenTheStagesWithoutKryo() throws Exception {
        TypeInformation<PartialWindow> type = DedupAndPartials.outputType();
        assertInstanceOf(PojoTypeInfo.class, type);
        var serializer = type.createSerializer(new SerializerConfigImpl());
        DataOutputSerializer out = new DataOutputSerializer(64);
        serializer.serialize(partial("1.5", "2"), out);
        PartialWindow back = serializer.deserialize(new DataInputDeserializer(out.getCopyOfBuffer()));
        assertEquals(KEY, back.key);
        assertEquals(new BigDecimal("3.500000000"), back.partial.value());
        assertEquals(2, back.partial.eventCount());
        // With generic types disabled, a field that needed Kryo would make this throw.
        SerializerConfigImpl noKryo = new SerializerConfigImpl();
        noKryo.setGenericTypes(false);
        assertEquals(serializer.getClass(), type.createSerializer(noKryo).getClass());
    }
}
