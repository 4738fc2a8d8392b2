package dev.meterflow.stages;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.math.BigDecimal;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import dev.meterflow.operators.WindowClose;

import org.apache.flink.api.common.serialization.SerializerConfigImpl;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.core.memory.DataInputDeserializer;
import org.apache.flink.core.memory.DataOutputSerializer;
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

/** The stages' edges: validated rows to events (by column name), late events to the late sink's rows. */
class StageRowsTest {
    private static final LogicalType STRING = new VarCharType(true, VarCharType.MAX_LENGTH);
    // The validated view's order differs from the stages' list: columns are found by name.
    private static final RowType INPUT = RowType.of(
        new LogicalType[] {STRING, STRING, STRING, STRING, STRING, new DecimalType(38, 9), new TimestampType(3), new MapType(STRING, STRING), STRING},
        new String[] {"dimensions_key", "event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions", "payload"});

    private static RowData row(String meter, Map<String, String> dims) {
        Map<StringData, StringData> map = new HashMap<>();
        dims.forEach((k, v) -> map.put(StringData.fromString(k), StringData.fromString(v)));
        return GenericRowData.of(StringData.fromString("{\"region\":\"eu\"}"), StringData.fromString("e1"), StringData.fromString("t"), StringData.fromString("c"),
            StringData.fromString(meter), DecimalData.fromBigDecimal(new BigDecimal("1.000000001"), 38, 9), TimestampData.fromEpochMillis(61_000L),
            new GenericMapData(map), null);
    }

    @Test
    void aValidatedRowBecomesAnEventWithItsUniqueValueAndDimensions() throws Exception {
        var events = StageRows.events(INPUT, Map.of("users", "user"));
        MeteredEvent e = events.map(row("users", Map.of("user", "u7")));
        assertEquals(List.of("t", "c", "users", "{\"region\":\"eu\"}", "e1"), List.of(e.tenantId, e.customerId, e.meter, e.dimensionsKey, e.eventId));
        assertEquals(61_000L, e.eventTimeMs);
        assertEquals(new BigDecimal("1.000000001"), e.quantity);
        assertEquals("u7", e.uniqueValue);
        assertArrayEquals(new String[] {"user"}, e.dimensionNames);
        MeteredEvent other = events.map(row("api_calls", Map.of("user", "u7")));
        assertNull(other.uniqueValue, "only a UNIQUE_COUNT meter reads its dimension");
        assertEquals(e.idHashHigh, other.idHashHigh, "the same (tenant, id): the same dedup key");
        assertNull(events.map(row("users", Map.of())).dimensionNames);
    }

    @Test
    void theReplayedColumnOfAHandoverMarksTheEvent() throws Exception {
        assertEquals(false, StageRows.events(INPUT, Map.of()).map(row("api_calls", Map.of())).replayed, "no such column: nothing replayed");
        LogicalType[] types = INPUT.getChildren().toArray(LogicalType[]::new);
        LogicalType[] withFlag = java.util.Arrays.copyOf(types, types.length + 1);
        withFlag[types.length] = new org.apache.flink.table.types.logical.BooleanType(false);
        String[] names = java.util.Arrays.copyOf(INPUT.getFieldNames().toArray(String[]::new), types.length + 1);
        names[types.length] = StageRows.REPLAYED_COLUMN;
        var events = StageRows.events(RowType.of(withFlag, names), Map.of());
        for (boolean flag : new boolean[] {true, false}) {
            GenericRowData in = (GenericRowData) row("api_calls", Map.of());
            GenericRowData flagged = new GenericRowData(types.length + 1);
            for (int i = 0; i < types.length; i++) {
                flagged.setField(i, in.getField(i));
            }
            flagged.setField(types.length, flag);
            assertEquals(flag, events.map(flagged).replayed);
        }
    }

    @Test
    void aMissingColumnIsNamed() {
        RowType without = RowType.of(new LogicalType[] {STRING}, new String[] {"event_id"});
        var e = assertThrows(IllegalArgumentException.class, () -> StageRows.events(without, Map.of()));
        assertEquals(true, e.getMessage().contains("tenant_id"));
    }

    @Test
    void aLateEventBecomesTheLateSinksRow() throws Exception {
        MeteredEvent e = StageRows.events(INPUT, Map.of()).map(row("api_calls", Map.of("region", "eu")));
        RowData late = StageRows.lateRows().map(new LateEvent(e, 60_000L, 120_000L, 200_000L));
        assertEquals(StageRows.LATE_COLUMNS.size(), late.getArity());
        assertEquals(StageRows.lateType().getFieldCount(), late.getArity());
        assertEquals("e1", late.getString(0).toString());
        assertEquals(new BigDecimal("1.000000001"), late.getDecimal(4, 38, 9).toBigDecimal());
        assertEquals(61_000L, late.getTimestamp(5, 3).getMillisecond());
        assertEquals("eu", late.getMap(6).valueArray().getString(0).toString());
        assertEquals(List.of(60_000L, 120_000L, 200_000L), List.of(late.getTimestamp(7, 3).getMillisecond(), late.getTimestamp(8, 3).getMillisecond(), late.getTimestamp(9, 3).getMillisecond()));
        assertEquals(200_000L - 61_000L, late.getLong(10));
        RowData early = StageRows.lateRows().map(new LateEvent(e, 60_000L, 120_000L, WindowClose.NO_WATERMARK));
        assertEquals(true, early.isNullAt(9) && early.isNullAt(10), "no watermark yet: none in the row");
    }

    @Test
    void eventsAndLateEventsCrossTheExchangeWithoutKryo() throws Exception {
        MeteredEvent e = StageRows.events(INPUT, Map.of()).map(row("api_calls", Map.of("region", "eu")));
        SerializerConfigImpl noKryo = new SerializerConfigImpl();
        noKryo.setGenericTypes(false);
        // With generic types disabled, a field that needed Kryo would make createSerializer throw.
        var events = TypeInformation.of(MeteredEvent.class).createSerializer(noKryo);
        var lates = DedupAndPartials.LATE.getTypeInfo().createSerializer(noKryo);
        DataOutputSerializer out = new DataOutputSerializer(256);
        lates.serialize(new LateEvent(e, 60_000L, 120_000L, 200_000L), out);
        LateEvent back = lates.deserialize(new DataInputDeserializer(out.getCopyOfBuffer()));
        assertEquals(List.of(e.eventId, e.idHashHigh, e.idHashLow, 200_000L), List.of(back.event.eventId, back.event.idHashHigh, back.event.idHashLow, back.watermarkMs));
        assertArrayEquals(new String[] {"eu"}, back.event.dimensionValues);
        assertEquals(0, back.event.quantity.compareTo(e.quantity));
        out.clear();
        events.serialize(e, out);
        assertEquals(e.tenantId, events.deserialize(new DataInputDeserializer(out.getCopyOfBuffer())).tenantId);
    }
}
