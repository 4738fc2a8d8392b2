package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.sql.SQLException;
import java.time.LocalDateTime;
import java.util.List;
import java.util.stream.Collectors;

import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;
import org.junit.jupiter.api.Test;

/** The writer's batch: newest row per window, final rows sticky, round trip through the checkpoint form. */
class UsageWindowSinkTest {
    private static Row update(RowKind kind, String customer, String quantity, long revision) {
        Row row = Row.of("t", customer, "api_calls", "{}", LocalDateTime.of(2026, 1, 1, 0, 0), LocalDateTime.of(2026, 1, 1, 0, 1), quantity, revision, revision);
        row.setKind(kind);
        return row;
    }

    @Test
    void keepsTheNewestRowPerWindowUntilTheBarrier() {
        UsageWindowSink.Writer writer = new UsageWindowSink.Writer(false);
        writer.write(update(RowKind.INSERT, "a", "1", 1), null);
        writer.write(update(RowKind.UPDATE_BEFORE, "a", "1", 1), null);
        writer.write(update(RowKind.UPDATE_AFTER, "a", "3.5", 2), null);
        writer.write(update(RowKind.INSERT, "b", "7", 1), null);
        List<UsageWindowSink.Batch> batches = List.copyOf(writer.prepareCommit());
        assertEquals(1, batches.size());
        assertEquals(2, batches.get(0).size());
        assertEquals("3.5", batches.get(0).rows.get(0).quantity);
        assertEquals(2L, batches.get(0).rows.get(0).revision);
        assertTrue(writer.prepareCommit().isEmpty(), "a batch is handed over once");
    }

    @Test
    void finalRowsAreReadFromEpochBoundsAndSurviveSerialization() throws Exception {
        UsageWindowSink.Writer writer = new UsageWindowSink.Writer(true);
        writer.write(Row.of("t", "c", "tokens", "{\"model\":\"x\"}", 60_000L, 120_000L, "12.000000001", 4L, 4L), null);
        UsageWindowSink.Batch batch = writer.prepareCommit().iterator().next();
        UsageWindowSink.BatchSerializer serializer = new UsageWindowSink.BatchSerializer();
        UsageWindowSink.Batch copy = serializer.deserialize(serializer.getVersion(), serializer.serialize(batch));
        UsageWindowSink.WindowRow row = copy.rows.get(0);
        assertEquals(60_000L, row.windowStartMs);
        assertEquals(120_000L, row.windowEndMs);
        assertEquals("12.000000001", row.quantity);
        assertEquals("{\"model\":\"x\"}", row.dimensionsKey);
        assertTrue(row.isFinal);
    }

    @Test
    void provisionalRowsOfTheSecondStageCarryEpochBounds() {
        UsageWindowSink.Writer writer = new UsageWindowSink.Writer(false);
        writer.write(Row.of("t", "c", "api_calls", "{}", 60_000L, 120_000L, "2", 2L, 2L), null);
        UsageWindowSink.WindowRow row = writer.prepareCommit().iterator().next().rows.get(0);
        assertEquals(List.of(60_000L, 120_000L), List.of(row.windowStartMs, row.windowEndMs));
        assertFalse(row.isFinal);
    }

    private static UsageWindowSink.Batch batchOf(Row... rows) {
        UsageWindowSink.Writer writer = new UsageWindowSink.Writer(false);
        for (Row row : rows) {
            writer.write(row, null);
        }
        return writer.prepareCommit().iterator().next();
    }

    @Test
    void batchesOfSeveralCheckpointsBecomeOneRowPerWindowInKeyOrder() {
        // After a restore the committer gets the batches of two checkpoints at once: one statement
        // must not touch a window twice, and every committer locks windows in the same order.
        UsageWindowSink.Batch older = batchOf(update(RowKind.INSERT, "b", "2", 2), update(RowKind.INSERT, "a", "1", 1));
        UsageWindowSink.Batch newer = batchOf(update(RowKind.UPDATE_AFTER, "b", "5", 5), update(RowKind.INSERT, "c", "1", 1));
        List<UsageWindowSink.WindowRow> rows = UsageWindowSink.inLockOrder(List.of(newer, older));
        assertEquals(List.of("a", "b", "c"), rows.stream().map(r -> r.customerId).collect(Collectors.toList()));
        assertEquals(5L, rows.get(1).revision, "the newer revision wins whatever the order of the batches");
    }

    @Test
    void deadlocksAndSerializationFailuresAreRetriedOtherFailuresAreNot() {
        SQLException batch = new SQLException("Batch entry 0 failed", "22000");
        batch.setNextException(new SQLException("deadlock detected", "40P01"));
        assertTrue(UsageWindowSink.isTransientConflict(batch));
        assertTrue(UsageWindowSink.isTransientConflict(new SQLException("could not serialize", "40001")));
        assertFalse(UsageWindowSink.isTransientConflict(new SQLException("connection refused", "08001")));
    }
}
