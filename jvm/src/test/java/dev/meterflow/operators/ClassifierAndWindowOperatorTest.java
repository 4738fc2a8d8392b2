package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;

import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.windowing.ProcessWindowFunction;
import org.apache.flink.streaming.api.windowing.assigners.TumblingEventTimeWindows;
import org.apache.flink.streaming.api.windowing.windows.TimeWindow;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.TimestampType;
import org.apache.flink.table.types.logical.VarCharType;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;
import org.junit.jupiter.api.Test;

/**
 * On a local MiniCluster: the classifier in front of Flink's own event-time window operator with
 * allowed lateness. Every event the classifier calls on time is counted by the window, none is
 * dropped by the window operator's late rule, and the boundary (watermark exactly at window end -
 * 1 ms + lateness) is late for both.
 */
class ClassifierAndWindowOperatorTest {
    private static final long WINDOW_MS = 10_000;
    private static final long LATENESS_MS = 10_000;

    /** An event: id, event time; a "wm:" id also moves the watermark to its time (punctuated). */
    private static Row event(String id, long eventMs) {
        return Row.of(id, eventMs);
    }

    private static final class Punctuated implements WatermarkGenerator<Row> {
        @Override
        public void onEvent(Row row, long eventTimestamp, WatermarkOutput output) {
            if (((String) row.getField(0)).startsWith("wm:")) {
                output.emitWatermark(new Watermark(eventTimestamp));
            }
        }

        @Override
        public void onPeriodicEmit(WatermarkOutput output) {}
    }

    private static final class Ids extends ProcessWindowFunction<RowData, String, Integer, TimeWindow> {
        private static final long serialVersionUID = 1L;

        @Override
        public void process(Integer key, Context context, Iterable<RowData> rows, Collector<String> out) {
            for (RowData row : rows) {
                out.collect("window:" + row.getString(2));
            }
        }
    }

    private static LocalDateTime utc(long ms) {
        return LocalDateTime.ofInstant(Instant.ofEpochMilli(ms), ZoneOffset.UTC);
    }

    @Test
    void onTimeMeansTheWindowOperatorCountsIt() throws Exception {
        long close = WindowClose.closeTime(WINDOW_MS, LATENESS_MS); // window [0, 10 s) closes at 19.999 s
        List<Row> input = List.of(
                event("a", 5_000),
                event("wm:fired", WINDOW_MS + 2_000), // the window fired, still open for lateness
                event("within", 9_000),
                event("wm:one-ms-before", close - 1),
                event("just-in-time", 9_999),
                event("wm:exactly", close),
                event("boundary", 9_999),
                event("boundary-early", 0),
                event("next-window", WINDOW_MS + 1),
                event("wm:end", 1_000_000));

        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
        env.setParallelism(1);
        DataStream<Row> events = env.fromData(Types.ROW(Types.STRING, Types.LONG), input.toArray(new Row[0]))
                .assignTimestampsAndWatermarks(WatermarkStrategy.<Row>forGenerator(ctx -> new Punctuated())
                        .withTimestampAssigner((row, ts) -> (Long) row.getField(1)));
        // The routed layout the classifier works on, in Flink's internal rows: event_time, window_end, id;
        // it appends watermark (3), lateness_ms (4), is_late (5).
        RowType routedType = RowType.of(new TimestampType(3), new TimestampType(3), VarCharType.STRING_TYPE);
        DataStream<RowData> routed = events.map(r -> {
            long t = (Long) r.getField(1);
            return (RowData) GenericRowData.of(TimestampData.fromEpochMillis(t), TimestampData.fromEpochMillis(t - t % WINDOW_MS + WINDOW_MS), StringData.fromString((String) r.getField(0)));
        }).returns(InternalTypeInfo.of(routedType));
        SingleOutputStreamOperator<RowData> classified = LatenessClassifier.apply(routed, routedType, new LatenessClassifier(0, 1, LATENESS_MS), "classify", "classify");

        OutputTag<RowData> dropped = new OutputTag<>("dropped-by-window", classified.getType());
        SingleOutputStreamOperator<String> windows = classified
                .filter(r -> !r.getBoolean(5))
                .keyBy(r -> 0, Types.INT)
                .window(TumblingEventTimeWindows.of(Duration.ofMillis(WINDOW_MS)))
                .allowedLateness(Duration.ofMillis(LATENESS_MS))
                .sideOutputLateData(dropped)
                .process(new Ids(), Types.STRING);
        DataStream<String> late = classified.filter(r -> r.getBoolean(5)).map(r -> "late:" + r.getString(2) + "@" + r.getTimestamp(3, 3).toLocalDateTime(), Types.STRING);
        DataStream<String> droppedIds = windows.getSideOutput(dropped).map(r -> "dropped:" + r.getString(2), Types.STRING);

        Set<String> counted = new HashSet<>();
        Set<String> lateIds = new HashSet<>();
        List<String> droppedByWindow = new ArrayList<>();
        try (var results = windows.union(late, droppedIds).executeAndCollect()) {
            results.forEachRemaining(s -> {
                if (s.startsWith("window:")) {
                    counted.add(s.substring(7));
                } else if (s.startsWith("late:")) {
                    lateIds.add(s.substring(5));
                } else {
                    droppedByWindow.add(s);
                }
            });
        }
        assertEquals(List.of(), droppedByWindow, "the window operator dropped an event the classifier called on time");
        assertEquals(Set.of("boundary@" + utc(close), "boundary-early@" + utc(close)), lateIds);
        assertTrue(counted.containsAll(Set.of("a", "within", "just-in-time", "next-window")), counted.toString());
        assertTrue(!counted.contains("boundary") && !counted.contains("boundary-early"), counted.toString());
    }
}
