package dev.meterflow.stages;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.math.BigDecimal;
import java.util.List;
import java.util.Map;

import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.ProcessFunctionTestHarnesses;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.types.logical.DecimalType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.MapType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.TimestampType;
import org.apache.flink.table.types.logical.VarCharType;
import org.junit.jupiter.api.Test;

/** The window guard's output split in its task: counted events to the stages, rejects unchanged aside. */
class CountedOrRejectedTest {
    private static final LogicalType STRING = new VarCharType(true, VarCharType.MAX_LENGTH);
    private static final RowType GUARDED = RowType.of(
        new LogicalType[] {STRING, STRING, STRING, STRING, new DecimalType(38, 9), new TimestampType(3), new MapType(STRING, STRING), STRING, STRING},
        new String[] {"event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions", "dimensions_key", "reject_reason"});

    private static GenericRowData row(String id, String reason) {
        return GenericRowData.of(StringData.fromString(id), StringData.fromString("t"), StringData.fromString("c"), StringData.fromString("api_calls"),
            DecimalData.fromBigDecimal(BigDecimal.ONE, 38, 9), TimestampData.fromEpochMillis(61_000L), new GenericMapData(Map.of()),
            StringData.fromString("{}"), reason == null ? null : StringData.fromString(reason));
    }

    @Test
    void countedEventsGoOnAndRejectsGoAsideUnchanged() throws Exception {
        try (var h = ProcessFunctionTestHarnesses.forProcessFunction(new CountedOrRejected(GUARDED, Map.of()))) {
            GenericRowData refused = row("r1", "dimension combinations: ...");
            h.processElement(new StreamRecord<>(row("e1", null), 61_000L));
            h.processElement(new StreamRecord<>(refused, 61_000L));
            h.processElement(new StreamRecord<>(row("e2", null), 62_000L));
            assertEquals(List.of("e1", "e2"), h.extractOutputValues().stream().map(e -> e.eventId).toList());
            var aside = h.getSideOutput(CountedOrRejected.rejectedTag(GUARDED));
            assertEquals(1, aside.size());
            RowData letter = aside.peek().getValue();
            // The record as the guard passed it, for its dead letter.
            assertEquals(GUARDED.getFieldCount(), letter.getArity());
            assertEquals("r1", letter.getString(0).toString());
            assertEquals("dimension combinations: ...", letter.getString(8).toString());
            assertEquals(61_000L, aside.peek().getTimestamp());
        }
    }

    @Test
    void rowsWithoutARejectColumnAreAllCounted() throws Exception {
        RowType counted = RowType.of(GUARDED.getChildren().subList(0, 8).toArray(LogicalType[]::new), GUARDED.getFieldNames().subList(0, 8).toArray(String[]::new));
        try (var h = ProcessFunctionTestHarnesses.forProcessFunction(new CountedOrRejected(counted, Map.of()))) {
            h.processElement(new StreamRecord<>(row("e1", null), 61_000L));
            assertEquals(1, h.extractOutputValues().size());
        }
    }
}
