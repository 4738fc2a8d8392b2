package dev.meterflow.stages;

import java.util.HashMap;
import java.util.List;
import java.util.Map;

import dev.meterflow.operators.WindowClose;

import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.MapData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.types.logical.BigIntType;
import org.apache.flink.table.types.logical.DecimalType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.MapType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.TimestampType;
import org.apache.flink.table.types.logical.VarCharType;

/**
 * Where the stages meet the SQL part of the graph, both in Flink's internal rows: the validated
 * events the first stage reads ({@link #events}), and the late events it routes, as the rows the
 * late-events sink reads ({@link #lateRows}).
 */
public final class StageRows {
    /** The columns of a validated event the stages read, by name in the input row. */
    public static final List<String> EVENT_COLUMNS = List.of("event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions", "dimensions_key");
    /** A boolean column the input holds at a handover only: true for a record the graph before it read already. */
    public static final String REPLAYED_COLUMN = "replayed";
    /** The late-events sink's columns but its processing time ({@code seen_at}, set by the sink's query), in order. */
    public static final List<String> LATE_COLUMNS = List.of("event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions", "window_start", "window_end", "watermark", "lateness_ms");

    private StageRows() {}

    /**
     * Validated, counted rows of {@code type} to {@link MeteredEvent}s; {@code uniqueDimensions} names
     * each UNIQUE_COUNT meter's dimension. A per-record function, chained into the window guard's task.
     */
    public static MapFunction<RowData, MeteredEvent> events(RowType type, Map<String, String> uniqueDimensions) {
        int[] at = EVENT_COLUMNS.stream().mapToInt(name -> {
            int i = type.getFieldIndex(name);
            if (i < 0) {
                throw new IllegalArgumentException("the stages' input has no column " + name + ": " + type);
            }
            return i;
        }).toArray();
        DecimalType quantity = (DecimalType) type.getTypeAt(at[4]);
        int precision = quantity.getPrecision();
        int scale = quantity.getScale();
        Map<String, String> unique = new HashMap<>(uniqueDimensions);
        int replayed = type.getFieldIndex(REPLAYED_COLUMN);
        return row -> {
            String meter = row.getString(at[3]).toString();
            String[][] dims = dimensions(row.isNullAt(at[6]) ? null : row.getMap(at[6]));
            String uniqueDimension = unique.get(meter);
            String uniqueValue = null;
            if (uniqueDimension != null && dims != null) {
                for (int i = 0; i < dims[0].length; i++) {
                    if (uniqueDimension.equals(dims[0][i])) {
                        uniqueValue = dims[1][i];
                    }
                }
            }
            MeteredEvent e = new MeteredEvent(row.getString(at[1]).toString(), row.getString(at[2]).toString(), meter, row.getString(at[7]).toString(),
                row.getString(at[0]).toString(), row.getTimestamp(at[5], 3).getMillisecond(), row.getDecimal(at[4], precision, scale).toBigDecimal(), uniqueValue);
            if (dims != null) {
                e.dimensionNames = dims[0];
                e.dimensionValues = dims[1];
            }
            e.replayed = replayed >= 0 && !row.isNullAt(replayed) && row.getBoolean(replayed);
            return e;
        };
    }

    private static String[][] dimensions(MapData map) {
        if (map == null || map.size() == 0) {
            return null;
        }
        String[] names = new String[map.size()];
        String[] values = new String[map.size()];
        for (int i = 0; i < map.size(); i++) {
            names[i] = map.keyArray().getString(i).toString();
            values[i] = map.valueArray().isNullAt(i) ? null : map.valueArray().getString(i).toString();
        }
        return new String[][] {names, values};
    }

    /** The type of {@link #lateRows}' rows: {@link #LATE_COLUMNS}. */
    public static RowType lateType() {
        LogicalType string = new VarCharType(false, VarCharType.MAX_LENGTH);
        LogicalType time = new TimestampType(false, 3);
        return RowType.of(
            new LogicalType[] {
                string, string, string, string, new DecimalType(false, 38, 9), time, new MapType(false, string, new VarCharType(true, VarCharType.MAX_LENGTH)),
                time, time, new TimestampType(true, 3), new BigIntType(true)
            },
            LATE_COLUMNS.toArray(String[]::new));
    }

    /** A late event as the late-events sink reads it: the event as sent, the window it missed, the watermark and its distance (NULL before any watermark). */
    public static MapFunction<LateEvent, RowData> lateRows() {
        return late -> {
            MeteredEvent e = late.event;
            Map<StringData, StringData> dims = new HashMap<>();
            if (e.dimensionNames != null) {
                for (int i = 0; i < e.dimensionNames.length; i++) {
                    dims.put(StringData.fromString(e.dimensionNames[i]), e.dimensionValues[i] == null ? null : StringData.fromString(e.dimensionValues[i]));
                }
            }
            boolean held = late.watermarkMs != WindowClose.NO_WATERMARK;
            return GenericRowData.of(
                StringData.fromString(e.eventId), StringData.fromString(e.tenantId), StringData.fromString(e.customerId), StringData.fromString(e.meter),
                DecimalData.fromBigDecimal(e.quantity, 38, 9), TimestampData.fromEpochMillis(e.eventTimeMs), new GenericMapData(dims),
                TimestampData.fromEpochMillis(late.windowStartMs), TimestampData.fromEpochMillis(late.windowEndMs),
                held ? TimestampData.fromEpochMillis(late.watermarkMs) : null, held ? late.watermarkMs - e.eventTimeMs : null);
        };
    }
}
