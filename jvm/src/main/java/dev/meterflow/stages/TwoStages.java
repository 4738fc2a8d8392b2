package dev.meterflow.stages;

import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import dev.meterflow.operators.WindowClose;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.types.Row;

/**
 * The usage job's counting part as two keyed stages, declared from Python (jobs/usage_job.py):
 * the window guard's output split ({@link CountedOrRejected}), its counted events keyed by their id hash into
 * {@link DedupAndPartials}, whose partials are keyed by window into {@link WindowMerger}. Each
 * operator has a stable uid, so a savepoint maps back after a resubmit.
 *
 * <p>Outputs: {@link #fires()} (provisional window rows), {@link #finals()} (each window's final row
 * once, stamped with its close time), both of the closer's row type, {@link #late()}, the late
 * events as the late-events sink's rows ({@link StageRows#lateType()}), and {@link #rejected()},
 * the input's rejected records, rows of its type.
 */
public final class TwoStages {
    private final DataStream<Row> fires;
    private final SingleOutputStreamOperator<Row> finals;
    private final DataStream<RowData> late;
    private final DataStream<RowData> rejected;

    private TwoStages(DataStream<Row> fires, SingleOutputStreamOperator<Row> finals, DataStream<RowData> late, DataStream<RowData> rejected) {
        this.fires = fires;
        this.finals = finals;
        this.late = late;
        this.rejected = rejected;
    }

    /**
     * @param guarded the window guard's output, of {@code type} (holding {@link StageRows#EVENT_COLUMNS}): events with no reject reason are counted
     * @param aggregations each meter's aggregation by name (SUM, COUNT, MAX, LATEST, UNIQUE_COUNT)
     * @param uniqueDimensions each UNIQUE_COUNT meter's dimension
     * @param maxPartials open windows per first-stage subtask before it emits all its partials
     * @param earlyFireMs processing time between the first stage's emissions and the second's early rows (0: none)
     * @param lateArrivalHoldMs how long a window closed or first seen before a partial arrives waits for what follows it
     * @param retainClosedMs how long a closed window's state stays for a partial from an input that was behind
     */
    public static TwoStages apply(DataStream<RowData> guarded, RowType type, long windowSizeMs, long allowedLatenessMs, long dedupHorizonMs,
            Map<String, String> aggregations, Map<String, String> uniqueDimensions, int maxPartials, long earlyFireMs, long lateArrivalHoldMs, long retainClosedMs) {
        return apply(guarded, type, windowSizeMs, allowedLatenessMs, dedupHorizonMs, aggregations, uniqueDimensions, maxPartials, earlyFireMs, lateArrivalHoldMs, retainClosedMs,
            WindowClose.NO_WATERMARK, WindowClose.NOTHING_CLOSED);
    }

    /**
     * As above, at a handover from the other graph: the first stage holds {@code handoverWatermarkMs}
     * and {@code handoverClosedThroughMs} from the start, and the input's {@code replayed} column, if
     * any, marks the records that graph read.
     */
    public static TwoStages apply(DataStream<RowData> guarded, RowType type, long windowSizeMs, long allowedLatenessMs, long dedupHorizonMs,
            Map<String, String> aggregations, Map<String, String> uniqueDimensions, int maxPartials, long earlyFireMs, long lateArrivalHoldMs, long retainClosedMs,
            long handoverWatermarkMs, long handoverClosedThroughMs) {
        Map<String, WindowPartial.Aggregation> byMeter = new HashMap<>();
        aggregations.forEach((meter, aggregation) -> byMeter.put(meter, WindowPartial.Aggregation.valueOf(aggregation)));
        SingleOutputStreamOperator<MeteredEvent> events = guarded.process(new CountedOrRejected(type, uniqueDimensions), TypeInformation.of(MeteredEvent.class))
            .name("metered events, rejects aside").uid("metered-events");
        SingleOutputStreamOperator<PartialWindow> partials = events.keyBy(MeteredEvent.idKey(), Types.TUPLE(Types.LONG, Types.LONG))
            .transform("dedup, classify late or on time, partial windows", DedupAndPartials.outputType(),
                new DedupAndPartials(windowSizeMs, allowedLatenessMs, Duration.ofMillis(dedupHorizonMs), byMeter, maxPartials, earlyFireMs, handoverWatermarkMs, handoverClosedThroughMs))
            .uid("dedup-and-partials");
        SingleOutputStreamOperator<Row> finals = partials.keyBy(WindowKey.selector(), Types.STRING)
            .process(new WindowMerger(allowedLatenessMs, lateArrivalHoldMs, retainClosedMs, earlyFireMs > 0), WindowMerger.outputType())
            .name("merge partials, close windows").uid("merge-partials-close-windows");
        DataStream<RowData> late = partials.getSideOutput(DedupAndPartials.LATE)
            .map(StageRows.lateRows(), InternalTypeInfo.of(StageRows.lateType())).name("late event rows").uid("late-event-rows");
        return new TwoStages(finals.getSideOutput(WindowMerger.FIRES), finals, late, events.getSideOutput(CountedOrRejected.rejectedTag(type)));
    }

    public DataStream<Row> fires() {
        return fires;
    }

    public DataStream<Row> finals() {
        return finals;
    }

    public DataStream<RowData> late() {
        return late;
    }

    public DataStream<RowData> rejected() {
        return rejected;
    }
}
