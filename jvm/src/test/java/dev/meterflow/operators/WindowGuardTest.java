package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.KeyedOneInputStreamOperatorTestHarness;
import org.apache.flink.streaming.util.OperatorSnapshotUtil;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.types.logical.BigIntType;
import org.apache.flink.table.types.logical.DecimalType;
import org.apache.flink.table.types.logical.IntType;
import org.apache.flink.table.types.logical.LocalZonedTimestampType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.MapType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.TimestampType;
import org.apache.flink.table.types.logical.VarBinaryType;
import org.apache.flink.table.types.logical.VarCharType;
import org.junit.jupiter.api.Test;

/** The window guard at its limits: combinations, sum of |quantity|, the close timer, a restore. */
class WindowGuardTest {
    private static final long WINDOW_MS = 60_000;
    private static final long LATENESS_MS = 10_000;
    private static final long START = 1_780_315_200_000L; // 2026-06-01T12:00:00Z
    private static final long CLOSE = WindowClose.closeTime(START + WINDOW_MS, LATENESS_MS);
    private static final String TOPIC = "usage-events";

    /** The guard's input layout as jobs/plan.py GUARD_INPUT_COLUMNS has it (the validated view without proc_time). */
    private static final String[] NAMES = {
        "event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions",
        "payload", "source_topic", "source_partition", "source_offset", "kafka_timestamp", "dimensions_key", "reject_reason"
    };
    private static final int REJECT = 13;
    private static final RowType TYPE = RowType.of(new LogicalType[] {
        VarCharType.STRING_TYPE, VarCharType.STRING_TYPE, VarCharType.STRING_TYPE, VarCharType.STRING_TYPE,
        new DecimalType(38, 9), new TimestampType(3), new MapType(VarCharType.STRING_TYPE, VarCharType.STRING_TYPE),
        new VarBinaryType(VarBinaryType.MAX_LENGTH), VarCharType.STRING_TYPE, new IntType(), new BigIntType(), new LocalZonedTimestampType(3),
        VarCharType.STRING_TYPE, VarCharType.STRING_TYPE
    }, NAMES);

    private static int n;

    /** A validated, countable event of tenant t1, meter tokens, one second into the window starting at {@code start}. */
    private static GenericRowData event(String customer, String dims, String quantity, long start) {
        long time = start + 1_000;
        int offset = n;
        return GenericRowData.of(
                StringData.fromString("e" + n++), StringData.fromString("t1"), StringData.fromString(customer), StringData.fromString("tokens"),
                DecimalData.fromBigDecimal(new BigDecimal(quantity), 38, 9), TimestampData.fromEpochMillis(time),
                new GenericMapData(Map.of(StringData.fromString("model"), StringData.fromString(dims))),
                new byte[] {(byte) offset, 1, 2}, StringData.fromString(TOPIC), 0, (long) offset, TimestampData.fromEpochMillis(time + 500),
                StringData.fromString("{\"model\":\"" + dims + "\"}"), null);
    }

    private static GenericRowData event(String dims, String quantity) {
        return event("c1", dims, quantity, START);
    }

    private static KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> harness(WindowGuard guard) throws Exception {
        return new KeyedOneInputStreamOperatorTestHarness<>(guard, guard.windowKey(), Types.STRING);
    }

    private static KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> harness(int maxCombinations) throws Exception {
        return harness(new WindowGuard(TYPE, maxCombinations, WINDOW_MS, LATENESS_MS));
    }

    private static KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> harness(String maxAbsSum) throws Exception {
        return harness(new WindowGuard(TYPE, 1000, WINDOW_MS, LATENESS_MS, new BigDecimal(maxAbsSum)));
    }

    /** Event ids passed on as countable (no reject reason), in order. */
    private static List<String> admitted(KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> h) {
        List<String> ids = new ArrayList<>();
        for (RowData row : h.extractOutputValues()) {
            if (row.isNullAt(REJECT)) {
                ids.add(row.getString(0).toString());
            }
        }
        return ids;
    }

    /** The records passed on with a reject reason: the refused ones. */
    private static List<RowData> refused(KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> h) {
        List<RowData> rows = new ArrayList<>();
        for (RowData row : h.extractOutputValues()) {
            if (!row.isNullAt(REJECT)) {
                rows.add(row);
            }
        }
        return rows;
    }

    private static List<String> reasons(KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> h) {
        List<String> out = new ArrayList<>();
        for (RowData row : refused(h)) {
            out.add(row.getString(REJECT).toString());
        }
        return out;
    }

    private static String id(RowData row) {
        return row.getString(0).toString();
    }

    private static void send(KeyedOneInputStreamOperatorTestHarness<String, RowData, RowData> h, RowData row) throws Exception {
        h.processElement(new StreamRecord<>(row, row.getTimestamp(5, 3).getMillisecond()));
    }

    @Test
    void exactlyTheCapOfCombinationsIsAdmittedAndTheNextRefusedWithItsReason() throws Exception {
        try (var h = harness(3)) {
            h.open();
            List<String> expected = new ArrayList<>();
            for (String dims : List.of("a", "b", "c")) {
                GenericRowData e = event(dims, "1");
                send(h, e);
                expected.add(id(e));
            }
            assertEquals(expected, admitted(h), "exactly max_dimension_combinations combinations");
            assertEquals(List.of(), reasons(h));

            GenericRowData fourth = event("d", "1");
            send(h, fourth);
            assertEquals(expected, admitted(h), "the fourth combination is not counted");
            assertEquals(List.of("dimension combinations: window 2026-06-01T12:00:00Z of t1/c1/tokens already has 3 combinations (input.max_dimension_combinations)"), reasons(h));
            // The refused record is the same record, reason set: raw bytes and coordinates kept for its dead letter.
            RowData letter = refused(h).get(0);
            assertEquals(id(fourth), id(letter));
            assertEquals(fourth.getBinary(7)[0], letter.getBinary(7)[0]);
            assertEquals(TOPIC, letter.getString(8).toString());
            assertEquals(fourth.getLong(10), letter.getLong(10));

            // An admitted combination still counts after the cap; the refused one stays refused.
            GenericRowData repeatFirst = event("a", "2");
            GenericRowData repeatLast = event("c", "2");
            send(h, repeatFirst);
            send(h, repeatLast);
            send(h, event("d", "1"));
            expected.add(id(repeatFirst));
            expected.add(id(repeatLast));
            assertEquals(expected, admitted(h));
            assertEquals(2, reasons(h).size());

            // Other customers and other windows have caps of their own.
            GenericRowData otherCustomer = event("c2", "d", "1", START);
            GenericRowData nextWindow = event("c1", "d", "1", START + WINDOW_MS);
            send(h, otherCustomer);
            send(h, nextWindow);
            expected.add(id(otherCustomer));
            expected.add(id(nextWindow));
            assertEquals(expected, admitted(h));
            assertEquals(2, reasons(h).size());
        }
    }

    @Test
    void exactlyTheCapOfUniqueValuesIsAdmittedAndTheNextRefusedWithItsReason() throws Exception {
        // tokens counts distinct models here; the cap is 2 values per window.
        WindowGuard guard = new WindowGuard(TYPE, 1000, WINDOW_MS, LATENESS_MS, Map.of("tokens", "model"), 2);
        try (var h = harness(guard)) {
            h.open();
            GenericRowData a = event("a", "1");
            GenericRowData b = event("b", "1");
            GenericRowData againA = event("a", "1");
            send(h, a);
            send(h, b);
            send(h, againA);
            assertEquals(List.of(id(a), id(b), id(againA)), admitted(h), "two values, and a value already held");
            GenericRowData third = event("c", "1");
            send(h, third);
            assertEquals(List.of("unique values: window 2026-06-01T12:00:00Z of t1/c1/tokens already has 2 distinct values of model (input.max_unique_values)"), reasons(h));
            assertEquals(id(third), id(refused(h).get(0)));
            // A copy of the refused event is refused again: it took no state.
            send(h, third);
            assertEquals(2, reasons(h).size());
            // Another customer's window and the next window have caps of their own.
            send(h, event("c2", "c", "1", START));
            send(h, event("c1", "c", "1", START + WINDOW_MS));
            assertEquals(5, admitted(h).size());
            // After the close the window holds nothing: a new value is judged by a fresh state.
            h.processWatermark(new Watermark(CLOSE));
            send(h, event("d", "1"));
            assertEquals(6, admitted(h).size());
        }
    }

    @Test
    void uniqueValuesAreCappedOnlyForTheMetersUniqueDimension() throws Exception {
        // A meter without a unique dimension, and an event without the dimension, take no unique state.
        WindowGuard other = new WindowGuard(TYPE, 1000, WINDOW_MS, LATENESS_MS, Map.of("seats", "model"), 1);
        WindowGuard absent = new WindowGuard(TYPE, 1000, WINDOW_MS, LATENESS_MS, Map.of("tokens", "user"), 1);
        for (WindowGuard guard : List.of(other, absent)) {
            try (var h = harness(guard)) {
                h.open();
                for (String model : List.of("a", "b", "c")) {
                    send(h, event(model, "1"));
                }
                assertEquals(3, admitted(h).size());
                assertEquals(List.of(), reasons(h));
            }
        }
        assertThrows(IllegalArgumentException.class, () -> new WindowGuard(TYPE, 1, WINDOW_MS, 0, Map.of(), 0));
    }

    @Test
    void decisionsGoOnFromTheStateAfterAWriteBack() throws Exception {
        WindowGuard guard = new WindowGuard(TYPE, 2, WINDOW_MS, LATENESS_MS, Map.of("tokens", "model"), 2);
        try (var h = harness(guard)) {
            h.open();
            send(h, event("a", "1"));
            send(h, event("b", "1"));
            assertEquals(1, h.numKeyedStateEntries(), "between checkpoints only the window's end is in state");
            h.snapshot(1L, 1L); // writes back and forgets the window in memory
            assertTrue(h.numKeyedStateEntries() > 1);
            send(h, event("c", "1")); // read again from state: two combinations, two values already
            send(h, event("b", "1")); // a key of the state's map
            assertEquals(3, admitted(h).size());
            assertEquals(1, reasons(h).size());
            assertTrue(reasons(h).get(0).startsWith("dimension combinations: "), reasons(h).toString());
        }
    }

    @Test
    void aBoundOnWindowsInMemoryWritesThemBack() throws Exception {
        int bound = WindowGuard.MAX_WINDOWS_IN_MEMORY;
        try (var h = harness(1000)) {
            h.open();
            for (int i = 0; i < bound; i++) {
                send(h, event("c" + i, "a", "1", START));
            }
            assertEquals(bound, h.numKeyedStateEntries(), "the bound held: only the windows' ends are in state");
            send(h, event("c" + bound, "a", "1", START));
            assertEquals(2 * bound + 1, h.numKeyedStateEntries(), "one window more: the held ones are written back first");
        }
    }

    @Test
    void aBoundOnKeysAndValuesInMemoryWritesThemBackAndDecisionsGoOn() throws Exception {
        int bound = WindowGuard.MAX_KEYS_IN_MEMORY;
        int events = bound / 2 + 1; // two held per event after the first: a new combination and a new value (the model is both)
        OperatorSubtaskState snapshot;
        WindowGuard guard = new WindowGuard(TYPE, Integer.MAX_VALUE, WINDOW_MS, LATENESS_MS, Map.of("tokens", "model"), Integer.MAX_VALUE);
        try (var h = harness(guard)) {
            h.open();
            for (int i = 0; i < events; i++) {
                send(h, event("m" + i, "1"));
            }
            assertEquals(1, h.numKeyedStateEntries(), "nothing but the window's end written yet");
            send(h, event("m" + events, "1"));
            // The bound is on keys and values, not windows: the one window was written back before that event.
            assertEquals(5, h.numKeyedStateEntries(), "end, window, keys, values and their count");
            snapshot = h.snapshot(1L, 1L);
            assertEquals(events + 1, admitted(h).size());
        }
        // Restored with the cap at exactly the values held: nothing was lost across the write-back.
        try (var h = harness(new WindowGuard(TYPE, Integer.MAX_VALUE, WINDOW_MS, LATENESS_MS, Map.of("tokens", "model"), events + 1))) {
            h.initializeState(snapshot);
            h.open();
            send(h, event("m0", "1"));
            send(h, event("m" + (events / 2), "1"));
            send(h, event("new", "1"));
            assertEquals(2, admitted(h).size());
            assertEquals(List.of("unique values: window 2026-06-01T12:00:00Z of t1/c1/tokens already has " + (events + 1) + " distinct values of model (input.max_unique_values)"), reasons(h));
        }
    }

    @Test
    void aCapOfOneAdmitsOneCombination() throws Exception {
        try (var h = harness(1)) {
            h.open();
            send(h, event("a", "1"));
            send(h, event("b", "1"));
            send(h, event("a", "1"));
            assertEquals(2, admitted(h).size());
            assertEquals(1, reasons(h).size());
            assertTrue(reasons(h).get(0).contains("already has 1 combinations"), reasons(h).toString());
        }
    }

    @Test
    void theStateIsClearedAtTheWindowsCloseAndNotBefore() throws Exception {
        try (var h = harness(1)) {
            h.open();
            send(h, event("a", "1"));
            assertEquals(1, h.numEventTimeTimers());
            h.processWatermark(new Watermark(CLOSE - 1));
            send(h, event("b", "1"));
            assertEquals(1, reasons(h).size(), "one millisecond before the close the window still holds its combination");
            assertTrue(h.numKeyedStateEntries() > 0);
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(0, h.numKeyedStateEntries(), "nothing kept after the close");
            assertEquals(0, h.numEventTimeTimers());
        }
    }

    @Test
    void theStateOfManyCombinationsIsClearedToo() throws Exception {
        try (var h = harness(5)) {
            h.open();
            for (String dims : List.of("a", "b", "c", "d", "e", "f")) {
                send(h, event(dims, "1"));
            }
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(0, h.numKeyedStateEntries());
        }
    }

    @Test
    void recordTimestampsAndWatermarksPassThrough() throws Exception {
        try (var h = harness(1)) {
            h.open();
            send(h, event("a", "1"));
            h.processWatermark(new Watermark(START + 5_000));
            send(h, event("b", "1"));
            List<Object> out = new ArrayList<>(h.getOutput());
            assertEquals(3, out.size(), out.toString());
            assertEquals(START + 1_000, ((StreamRecord<?>) out.get(0)).getTimestamp());
            assertEquals(new Watermark(START + 5_000), out.get(1));
            assertEquals(START + 1_000, ((StreamRecord<?>) out.get(2)).getTimestamp(), "a refused record keeps its timestamp too");
        }
    }

    @Test
    void theSumOfAbsoluteQuantitiesExactlyAtTheLimitIsAdmittedAndOneUnitPastRefused() throws Exception {
        try (var h = harness("10")) {
            h.open();
            send(h, event("a", "4"));
            send(h, event("b", "-5.999999999"));
            send(h, event("a", "0.000000001")); // |4| + |-5.999999999| + 0.000000001 = 10: at the limit
            assertEquals(3, admitted(h).size());
            GenericRowData past = event("a", "0.000000001");
            send(h, past);
            GenericRowData negativePast = event("b", "-0.000000001");
            send(h, negativePast);
            send(h, event("a", "0"));
            assertEquals(4, admitted(h).size(), "zero still fits; a negative unit past does not, whatever its sign");
            assertEquals(List.of(
                    "window quantity overflow: window 2026-06-01T12:00:00Z of t1/c1/tokens: sum of |quantity| would pass 10 (decimal(38, 9))",
                    "window quantity overflow: window 2026-06-01T12:00:00Z of t1/c1/tokens: sum of |quantity| would pass 10 (decimal(38, 9))"), reasons(h));
            // A refused event added nothing: a new combination of zero still fits.
            send(h, event("c", "0"));
            assertEquals(5, admitted(h).size());
        }
    }

    @Test
    void theRealLimitIsTheLargestDecimal38By9() throws Exception {
        assertEquals(new BigDecimal("1e29").subtract(new BigDecimal("1e-9")), WindowGuard.MAX_WINDOW_ABS_SUM);
        try (var h = harness(1000)) {
            h.open();
            send(h, event("a", "99999999999999999999999999998.999999999"));
            send(h, event("a", "1")); // exactly the maximum
            assertEquals(2, admitted(h).size());
            send(h, event("a", "0.000000001"));
            assertEquals(2, admitted(h).size());
            assertEquals(1, reasons(h).size());
            assertTrue(reasons(h).get(0).startsWith("window quantity overflow: "), reasons(h).toString());
            assertTrue(reasons(h).get(0).contains("99999999999999999999999999999.999999999"), reasons(h).toString());
        }
    }

    @Test
    void aSnapshotRestoresTheDecisions() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(new WindowGuard(TYPE, 2, WINDOW_MS, LATENESS_MS, new BigDecimal("10")))) {
            h.open();
            send(h, event("a", "3"));
            send(h, event("b", "4"));
            snapshot = h.snapshot(1L, 1L);
        }
        try (var h = harness(new WindowGuard(TYPE, 2, WINDOW_MS, LATENESS_MS, new BigDecimal("10")))) {
            h.initializeState(snapshot);
            h.open();
            send(h, event("c", "1"));        // a third combination: refused
            send(h, event("b", "3"));        // 3 + 4 + 3 = 10: admitted
            send(h, event("a", "0.000000001")); // past 10: refused
            assertEquals(1, admitted(h).size());
            assertEquals(2, reasons(h).size());
            assertTrue(reasons(h).get(0).startsWith("dimension combinations: "));
            assertTrue(reasons(h).get(1).startsWith("window quantity overflow: "));
            assertEquals(1, h.numEventTimeTimers(), "the close timer is restored");
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(0, h.numKeyedStateEntries());
        }
    }

    @Test
    void aSnapshotOfTheGuardAsAKeyedProcessFunctionRestores() throws Exception {
        // Written by the release before, whose guard was a KeyedProcessFunction: events a (3) and b (4)
        // of one window, cap 2. The same state names and timer service restore into this operator.
        String path = WindowGuardTest.class.getResource("guard-keyed-process-function.snapshot").getPath();
        try (var h = harness(new WindowGuard(TYPE, 2, WINDOW_MS, LATENESS_MS, new BigDecimal("10")))) {
            h.initializeState(OperatorSnapshotUtil.readStateHandle(path));
            h.open();
            assertEquals(1, h.numEventTimeTimers(), "the close timer is restored");
            send(h, event("c", "1"));           // a third combination: refused
            send(h, event("a", "3"));           // 3 + 4 + 3 = 10: admitted
            send(h, event("b", "0.000000001")); // past 10: refused
            assertEquals(1, admitted(h).size());
            assertEquals(2, reasons(h).size());
            assertTrue(reasons(h).get(0).startsWith("dimension combinations: "));
            assertTrue(reasons(h).get(1).startsWith("window quantity overflow: "));
            h.processWatermark(new Watermark(CLOSE));
            assertEquals(0, h.numKeyedStateEntries());
        }
    }

    @Test
    void aRaisedLatenessKeepsTheLimitsUntilTheNewCloseTime() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(new WindowGuard(TYPE, 1, WINDOW_MS, LATENESS_MS))) {
            h.open();
            send(h, event("a", "1"));
            snapshot = h.snapshot(1L, 1L);
        }
        long raised = 30_000;
        long newClose = WindowClose.closeTime(START + WINDOW_MS, raised);
        try (var h = harness(new WindowGuard(TYPE, 1, WINDOW_MS, raised))) {
            h.initializeState(snapshot);
            h.open();
            h.processWatermark(new Watermark(CLOSE)); // the timer of the old 10 s lateness fires ...
            assertEquals(1, h.numEventTimeTimers(), "... and moves to the close time under 30 s");
            h.processWatermark(new Watermark(newClose - 1));
            send(h, event("b", "1"));
            assertEquals(1, reasons(h).size(), "the window still holds its one combination, one ms before the new close");
            h.processWatermark(new Watermark(newClose));
            assertEquals(0, h.numKeyedStateEntries(), "nothing kept after the new close");
            assertEquals(0, h.numEventTimeTimers());
        }
    }

    @Test
    void aLoweredLatenessClearsTheWindowAtItsRestoredTimer() throws Exception {
        OperatorSubtaskState snapshot;
        try (var h = harness(new WindowGuard(TYPE, 1, WINDOW_MS, LATENESS_MS))) {
            h.open();
            send(h, event("a", "1"));
            snapshot = h.snapshot(1L, 1L);
        }
        try (var h = harness(new WindowGuard(TYPE, 1, WINDOW_MS, 1_000))) {
            h.initializeState(snapshot);
            h.open();
            h.processWatermark(new Watermark(CLOSE)); // the old timer: past the new close time, so the window is done
            assertEquals(0, h.numKeyedStateEntries());
            assertEquals(0, h.numEventTimeTimers());
        }
    }

    @Test
    void aRecordAlreadyRejectedPassesUntouchedKeyedByItsCoordinates() throws Exception {
        try (var h = harness(1)) {
            h.open();
            send(h, event("a", "1"));
            GenericRowData rejected = new GenericRowData(NAMES.length);
            rejected.setField(7, new byte[] {9});
            rejected.setField(8, StringData.fromString(TOPIC));
            rejected.setField(9, 2);
            rejected.setField(10, 77L);
            rejected.setField(5, TimestampData.fromEpochMillis(0));
            rejected.setField(REJECT, StringData.fromString("unknown meter: x"));
            h.processElement(new StreamRecord<>(rejected, 0));
            assertEquals(List.of("unknown meter: x"), reasons(h));
            RowData passed = refused(h).get(0);
            assertEquals(9, passed.getBinary(7)[0], "the same record, untouched");
            assertEquals(77L, passed.getLong(10));
            assertTrue(new WindowGuard(TYPE, 1, WINDOW_MS, 0).windowKey().getKey(rejected).contains("77"));
        }
    }

    @Test
    void theKeyIsTheWindowNotTheDimensions() throws Exception {
        var key = new WindowGuard(TYPE, 1, WINDOW_MS, 0).windowKey();
        assertEquals(key.getKey(event("c1", "a", "1", START)), key.getKey(event("c1", "b", "2", START)));
        assertTrue(!key.getKey(event("c1", "a", "1", START)).equals(key.getKey(event("c1", "a", "1", START + WINDOW_MS))));
        assertTrue(!key.getKey(event("c1", "a", "1", START)).equals(key.getKey(event("c2", "a", "1", START))));
    }

    @Test
    void aMissingColumnFailsAtDeclarationWithItsName() {
        RowType partial = RowType.of(new LogicalType[] {VarCharType.STRING_TYPE}, new String[] {"tenant_id"});
        var e = assertThrows(IllegalArgumentException.class, () -> new WindowGuard(partial, 1, WINDOW_MS, 0));
        assertTrue(e.getMessage().contains("customer_id"), e.getMessage());
    }
}
