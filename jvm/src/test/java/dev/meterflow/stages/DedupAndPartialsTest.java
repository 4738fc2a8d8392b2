package dev.meterflow.stages;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.math.BigDecimal;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import dev.meterflow.stages.WindowPartial.Aggregation;

import org.apache.flink.api.common.typeinfo.TypeHint;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.runtime.state.KeyGroupRangeAssignment;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.AbstractStreamOperatorTestHarness;
import org.apache.flink.streaming.util.KeyedOneInputStreamOperatorTestHarness;
import org.junit.jupiter.api.Test;

/** The first stage: dedup, the late decision at the boundary, partials emitted before the watermark that fires them, restores and rescales. */
class DedupAndPartialsTest {
    private static final long SIZE = 60_000;
    private static final long LATENESS = 10_000;
    private static final long W0 = 1_700_000_040_000L; // a window start (a multiple of SIZE)
    private static final long END = W0 + SIZE;
    private static final long CLOSE = END - 1 + LATENESS;
    private static final int MAX_PARALLELISM = 128;

    private static KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> harness() throws Exception {
        return harness(1, 0, 1_000);
    }

    private static KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> harness(int parallelism, int subtask, int maxPartials) throws Exception {
        DedupAndPartials op = new DedupAndPartials(SIZE, LATENESS, Duration.ofDays(7), Map.of("peak", Aggregation.MAX), maxPartials, 0);
        return new KeyedOneInputStreamOperatorTestHarness<>(op, MeteredEvent.idKey(), TypeInformation.of(new TypeHint<Tuple2<Long, Long>>() {}), MAX_PARALLELISM, parallelism, subtask);
    }

    private static MeteredEvent event(String tenant, String id, String customer, long timeMs, String quantity) {
        return new MeteredEvent(tenant, customer, "api_calls", "{}", id, timeMs, new BigDecimal(quantity), null);
    }

    private static void send(KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> h, MeteredEvent e) throws Exception {
        h.processElement(new StreamRecord<>(e, e.eventTimeMs));
    }

    /** The output so far as text: partials as "customer@start=value/count", watermarks as "wm:<ms>". */
    private static List<String> output(KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> h) {
        List<String> out = new ArrayList<>();
        for (Object o : h.getOutput()) {
            if (o instanceof Watermark w) {
                out.add("wm:" + w.getTimestamp());
            } else {
                PartialWindow p = (PartialWindow) ((StreamRecord<?>) o).getValue();
                out.add(p.key.customerId + "@" + (p.key.windowStartMs - W0) + "=" + p.partial.value().stripTrailingZeros().toPlainString() + "/" + p.partial.eventCount());
            }
        }
        return out;
    }

    private static List<String> late(KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> h) {
        List<String> out = new ArrayList<>();
        var records = h.getSideOutput(DedupAndPartials.LATE);
        if (records != null) {
            for (StreamRecord<LateEvent> r : records) {
                out.add(r.getValue().event.eventId);
            }
        }
        return out;
    }

    private static KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> handover(long watermarkMs) throws Exception {
        return handover(watermarkMs, dev.meterflow.operators.WindowClose.NOTHING_CLOSED);
    }

    private static KeyedOneInputStreamOperatorTestHarness<Tuple2<Long, Long>, MeteredEvent, PartialWindow> handover(long watermarkMs, long closedThroughMs) throws Exception {
        DedupAndPartials op = new DedupAndPartials(SIZE, LATENESS, Duration.ofDays(7), Map.of(), 1_000, 0, watermarkMs, closedThroughMs);
        return new KeyedOneInputStreamOperatorTestHarness<>(op, MeteredEvent.idKey(), TypeInformation.of(new TypeHint<Tuple2<Long, Long>>() {}), MAX_PARALLELISM, 1, 0);
    }

    private static MeteredEvent replayed(MeteredEvent e) {
        e.replayed = true;
        return e;
    }

    @Test
    void atAHandoverTheWindowsClosedBeforeStayClosedAndWhatWasReadBeforeOnlyMarksItsIdThere() throws Exception {
        // The graph before closed W0 (its watermark reached CLOSE) and left the next window open.
        try (var h = handover(CLOSE)) {
            h.open();
            send(h, replayed(event("t", "read-closed", "c", END - 1, "1"))); // counted before, in W0: its id only
            send(h, replayed(event("t", "read-open", "c", END, "2"))); // read before, its window open here: counts
            send(h, event("t", "new-closed", "c", W0 + 2, "4")); // first read here, its window closed: late
            send(h, event("t", "read-closed", "c", END + 2, "8")); // a copy of an id read before: a duplicate
            send(h, replayed(event("t", "read-closed-2", "c", W0 + 3, "32"))); // routed late before: nowhere again
            send(h, event("t", "new-open", "c", END + 3, "16"));
            h.processWatermark(new Watermark(CLOSE - 5_000)); // the replay's own watermark, behind the one held
            h.prepareSnapshotPreBarrier(1);
            assertEquals(List.of("new-closed"), late(h));
            assertEquals(CLOSE, h.getSideOutput(DedupAndPartials.LATE).peek().getValue().watermarkMs);
            assertEquals(List.of("wm:" + CLOSE, "c@60000=18/2"), output(h));
        }
    }

    @Test
    void theClosedThroughBoundaryHandedOverClosesItsWindowsToo() throws Exception {
        // The graph before closed the next window too (a lateness lowered before), though its watermark is CLOSE.
        try (var h = handover(CLOSE, END + SIZE)) {
            h.open();
            send(h, event("t", "next", "c", END, "1"));
            send(h, event("t", "after", "c", END + SIZE, "2"));
            h.prepareSnapshotPreBarrier(1);
            assertEquals(List.of("next"), late(h));
            assertEquals(List.of("c@120000=2/1"), output(h));
        }
    }

    @Test
    void aRestoredWatermarkAboveTheHandoversWins() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = handover(CLOSE)) {
            h.open();
            h.processWatermark(new Watermark(CLOSE + SIZE));
            snapshot = h.snapshot(1, 1);
        }
        try (var h = handover(CLOSE)) {
            h.initializeState(snapshot);
            h.open();
            send(h, event("t", "e", "c", END, "1")); // the next window closed after the handover: late
            assertEquals(List.of("e"), late(h));
            assertEquals(CLOSE + SIZE, ((DedupAndPartials) h.getOperator()).heldWatermark());
        }
    }

    @Test
    void theFirstCopyOfAnIdCountsPerTenant() throws Exception {
        try (var h = harness()) {
            h.open();
            send(h, event("t1", "e1", "c", W0 + 1, "2"));
            send(h, event("t1", "e1", "c", W0 + 2, "5")); // a duplicate, whatever it says
            send(h, event("t2", "e1", "c", W0 + 3, "3")); // another tenant's id
            h.processWatermark(new Watermark(END - 1));
            assertEquals(List.of("c@0=2/1", "c@0=3/1", "wm:" + (END - 1)), sorted(output(h)));
        }
    }

    @Test
    void partialsGoBeforeTheWatermarkThatFiresTheirWindowAndOnlyThose() throws Exception {
        try (var h = harness()) {
            h.open();
            send(h, event("t", "a", "c", W0 + 5, "1.5"));
            send(h, event("t", "b", "c", W0 + 6, "2"));
            send(h, event("t", "n", "c", END + 5, "7")); // the next window
            h.processWatermark(new Watermark(END - 2)); // one ms before the first fire
            assertEquals(List.of("wm:" + (END - 2)), output(h));
            h.processWatermark(new Watermark(END - 1)); // fires [W0, END)
            assertEquals(List.of("wm:" + (END - 2), "c@0=3.5/2", "wm:" + (END - 1)), output(h));
            h.prepareSnapshotPreBarrier(1); // the next window's partial leaves before the barrier
            assertEquals("c@" + SIZE + "=7/1", output(h).get(3));
        }
    }

    @Test
    void anEventIsLateFromItsWindowsCloseTimeOn() throws Exception {
        try (var h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE - 1));
            send(h, event("t", "on-time", "c", END - 1, "1")); // the last ms of the window, one ms before its close
            h.processWatermark(new Watermark(CLOSE));
            send(h, event("t", "late", "c", END - 1, "1"));
            send(h, event("t", "next", "c", END, "4")); // the next window is open
            h.prepareSnapshotPreBarrier(1);
            assertEquals(List.of("late"), late(h));
            LateEvent late = h.getSideOutput(DedupAndPartials.LATE).peek().getValue();
            assertEquals(List.of(W0, END, CLOSE), List.of(late.windowStartMs, late.windowEndMs, late.watermarkMs), "the window it missed and the watermark it was judged against");
            assertEquals(List.of("wm:" + (CLOSE - 1), "c@0=1/1", "wm:" + CLOSE, "c@" + SIZE + "=4/1"), output(h));
        }
    }

    @Test
    void aLateEventsIdIsRememberedToo() throws Exception {
        try (var h = harness()) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            send(h, event("t", "x", "c", W0, "1"));
            send(h, event("t", "x", "c", W0, "1"));
            assertEquals(List.of("x"), late(h));
        }
    }

    @Test
    void noPartialIsInACheckpointAndARestoreKeepsTheHeldWatermarkAndTheIds() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness()) {
            h.open();
            send(h, event("t", "a", "c", W0, "1"));
            h.processWatermark(new Watermark(CLOSE - 5_000)); // fired, within the lateness
            send(h, event("t", "b", "c", W0, "2")); // late data within the lateness, in flight
            h.prepareSnapshotPreBarrier(1);
            snapshot = h.snapshot(1, 1);
            assertEquals(List.of("c@0=1/1", "wm:" + (CLOSE - 5_000), "c@0=2/1"), output(h));
        }
        try (var h = harness()) {
            h.initializeState(snapshot);
            h.open();
            // Before any watermark after the restore: judged against the held one.
            send(h, event("t", "b", "c", W0, "2")); // replayed from the source: a duplicate now
            send(h, event("t", "d", "c", W0, "3")); // still within the lateness
            h.processWatermark(new Watermark(CLOSE));
            send(h, event("t", "e", "c", W0, "9")); // closed
            assertEquals(List.of("c@0=3/1", "wm:" + CLOSE), output(h));
            assertEquals(List.of("e"), late(h));
        }
    }

    @Test
    void aRescaledRestoreJudgesAgainstTheHighestHeldWatermark() throws Exception {
        OperatorSubtaskState low;
        OperatorSubtaskState high;
        try (var h = harness(2, 0, 1_000)) {
            h.open();
            h.processWatermark(new Watermark(CLOSE - 100));
            low = h.snapshot(1, 1);
        }
        try (var h = harness(2, 1, 1_000)) {
            h.open();
            h.processWatermark(new Watermark(CLOSE));
            high = h.snapshot(1, 1);
        }
        OperatorSubtaskState both = AbstractStreamOperatorTestHarness.repackageState(low, high);
        for (int subtasks : new int[] {1, 3}) {
            for (int subtask = 0; subtask < subtasks; subtask++) {
                try (var h = harness(subtasks, subtask, 1_000)) {
                    h.initializeState(AbstractStreamOperatorTestHarness.repartitionOperatorState(both, MAX_PARALLELISM, 2, subtasks, subtask));
                    h.open();
                    MeteredEvent e = ownedBy(subtasks, subtask, END - 1);
                    send(h, e);
                    assertEquals(List.of(e.eventId), late(h), subtasks + " subtasks, subtask " + subtask);
                }
            }
        }
    }

    @Test
    void aBoundOnOpenWindowsEmitsThemAll() throws Exception {
        try (var h = harness(1, 0, 3)) {
            h.open();
            send(h, event("t", "a", "c1", W0, "1"));
            send(h, event("t", "b", "c2", W0, "1"));
            assertEquals(List.of(), output(h));
            send(h, event("t", "c", "c3", W0 + SIZE, "1"));
            assertEquals(3, output(h).size());
            send(h, event("t", "d", "c1", W0, "1")); // a new partial of a window emitted before
            h.prepareSnapshotPreBarrier(1);
            assertEquals("c1@0=1/1", output(h).get(3));
        }
    }

    @Test
    void aBoundOnDistinctValuesHeldEmitsThemAll() throws Exception {
        DedupAndPartials op = new DedupAndPartials(SIZE, LATENESS, Duration.ofDays(7), Map.of("users", Aggregation.UNIQUE_COUNT), 1_000, 0);
        try (var h = new KeyedOneInputStreamOperatorTestHarness<>(op, MeteredEvent.idKey(), TypeInformation.of(new TypeHint<Tuple2<Long, Long>>() {}))) {
            h.open();
            int bound = DedupAndPartials.MAX_HELD_UNIQUE_VALUES;
            // Two windows share the bound; a repeated value holds nothing more.
            for (int i = 0; i < bound - 1; i++) {
                long window = i % 2 == 0 ? W0 : W0 + SIZE;
                h.processElement(new StreamRecord<>(new MeteredEvent("t", "c", "users", "{}", "u" + i, window, BigDecimal.ONE, "v" + i)));
            }
            h.processElement(new StreamRecord<>(new MeteredEvent("t", "c", "users", "{}", "again", W0, BigDecimal.ONE, "v0")));
            assertEquals(0, h.getOutput().size(), "one value below the bound nothing is emitted");
            h.processElement(new StreamRecord<>(new MeteredEvent("t", "c", "users", "{}", "last", W0, BigDecimal.ONE, "new")));
            assertEquals(2, h.getOutput().size(), "at the bound both windows' partials are emitted");
            long values = 0;
            for (Object o : h.getOutput()) {
                values += ((PartialWindow) ((StreamRecord<?>) o).getValue()).partial.uniqueValues();
            }
            assertEquals(bound, values);
            // The count starts again from nothing: one more value is held, not emitted.
            h.processElement(new StreamRecord<>(new MeteredEvent("t", "c", "users", "{}", "after", W0, BigDecimal.ONE, "v1")));
            assertEquals(2, h.getOutput().size());
        }
    }

    @Test
    void aMetersAggregationIsItsOwn() throws Exception {
        try (var h = harness()) {
            h.open();
            for (String q : new String[] {"3", "9", "4"}) {
                h.processElement(new StreamRecord<>(new MeteredEvent("t", "c", "peak", "{}", "p" + q, W0, new BigDecimal(q), null)));
            }
            h.prepareSnapshotPreBarrier(1);
            PartialWindow p = (PartialWindow) ((StreamRecord<?>) h.getOutput().peek()).getValue();
            assertEquals(new BigDecimal("9.000000000"), p.partial.value());
            assertTrue(p.partial.aggregation() == Aggregation.MAX);
        }
    }

    /** An event whose id key the subtask owns (a harness refuses keys of other subtasks). */
    private static MeteredEvent ownedBy(int subtasks, int subtask, long timeMs) throws Exception {
        for (int i = 0; ; i++) {
            MeteredEvent e = event("t", "x" + i, "c", timeMs, "1");
            if (KeyGroupRangeAssignment.assignKeyToParallelOperator(MeteredEvent.idKey().getKey(e), MAX_PARALLELISM, subtasks) == subtask) {
                return e;
            }
        }
    }

    private static List<String> sorted(List<String> in) {
        List<String> out = new ArrayList<>(in);
        out.sort(null);
        return out;
    }
}
