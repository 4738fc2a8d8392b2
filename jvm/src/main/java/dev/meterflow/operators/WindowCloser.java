package dev.meterflow.operators;

import java.time.LocalDateTime;
import java.time.ZoneOffset;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.TimeDomain;
import org.apache.flink.streaming.api.operators.TimestampedCollector;
import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;
import org.apache.flink.util.Collector;

/**
 * Closes windows: keyed by window, keeps the latest value from the window aggregate's upsert
 * changelog and emits it once, when the watermark passes window end - 1 ms + allowed lateness (the
 * instant Flink's window operator purges the window), so the emitted value is final.
 *
 * <p>Input rows: tenant_id, customer_id, meter, dimensions_key, window_start, window_end (UTC
 * LocalDateTime), quantity (exact decimal string), event_count, revision. Output rows: the same,
 * with the window bounds as epoch milliseconds ({@link #outputType()}). State and timers are
 * checkpointed; one element per window update, in the JVM.
 *
 * <p>A window's first row can reach this operator after its watermark has already passed the close
 * time: when an input that was idle (an idle source partition) becomes active again, the other
 * inputs have carried the watermark on without it, and its rows arrive behind. An event-time timer
 * registered then would only fire on the next watermark advance, which for a quiet source may never
 * come, so such a window is held for {@code lateArrivalHoldMs} of processing time and then emitted,
 * stamped with its close time. The window's later rows, its re-fires within the allowed lateness,
 * travel on the same channel from the one window subtask that owns it, right behind the first,
 * so the hold gathers them into one emission with the newest value instead of one emission each.
 *
 * <p>The allowed lateness may differ from the one a restored timer was registered under (a job
 * resubmitted from a savepoint with a new {@code event_time.allowed_lateness}). A timer that fires
 * before the window's close time under the current lateness (raised) moves to that time: Flink's
 * window operator keeps the window open until then and its updates still come. A timer at or after
 * it (lowered, or unchanged) emits: a window the lowering closed is emitted, with every event it
 * counted, when the watermark reaches the close time it was registered with, at the latest its
 * old one (no update can come meanwhile: the classifier routes its events late).
 *
 * <p>Metrics: {@code meterflow.window_refires}, the updates of a window after its first fire (the
 * watermark had passed its end), which only allowed lateness lets happen: each one is a late
 * event that still counted, and a window whose final value comes later than its first;
 * {@code meterflow.windows_closed}, the final rows emitted, a window emitted again after the hold
 * included; and {@code meterflow.window_refinals}, registered so both graphs expose the same
 * metrics but not counted here: the closer keeps nothing of a window after its final row, so it
 * cannot tell a window emitted again from one first seen late (the two-stage graph's second stage can).
 */
public class WindowCloser extends KeyedProcessFunction<String, Row, Row> {
    private static final long serialVersionUID = 1L;
    private static final String[] NAMES = {
        "tenant_id", "customer_id", "meter", "dimensions_key", "window_start_ms", "window_end_ms", "quantity", "event_count", "revision"
    };

    private final long allowedLatenessMs;
    private final long lateArrivalHoldMs;
    private transient ValueState<Row> latest;
    private transient Counter refires;
    private transient Counter closed;

    /**
     * @param allowedLatenessMs the window aggregate's allowed lateness
     * @param lateArrivalHoldMs how long a window whose first row arrives after its close time waits for its re-fires
     */
    public WindowCloser(long allowedLatenessMs, long lateArrivalHoldMs) {
        this.allowedLatenessMs = allowedLatenessMs;
        this.lateArrivalHoldMs = lateArrivalHoldMs;
    }

    /** Row type of closed windows. */
    public static TypeInformation<Row> outputType() {
        return Types.ROW_NAMED(NAMES, Types.STRING, Types.STRING, Types.STRING, Types.STRING, Types.LONG, Types.LONG, Types.STRING, Types.LONG, Types.LONG);
    }

    /** Key of the window a changelog row belongs to. */
    public static KeySelector<Row, String> windowKey() {
        return new WindowKey();
    }

    @Override
    public void open(OpenContext openContext) {
        latest = getRuntimeContext().getState(new ValueStateDescriptor<>("latest-window-value", outputType()));
        MetricGroup group = getRuntimeContext().getMetricGroup().addGroup("meterflow");
        refires = group.counter("window_refires");
        closed = group.counter("windows_closed");
        group.counter("window_refinals");
    }

    @Override
    public void processElement(Row row, Context ctx, Collector<Row> out) throws Exception {
        // An upsert changelog carries each window's newest value as +I/+U; nothing else updates it.
        if (row.getKind() != RowKind.INSERT && row.getKind() != RowKind.UPDATE_AFTER) {
            return;
        }
        long endMs = WindowClose.epochMs(row.getField(5));
        Row value = Row.of(row.getField(0), row.getField(1), row.getField(2), row.getField(3), WindowClose.epochMs(row.getField(4)), endMs, row.getField(6), row.getField(7), row.getField(8));
        boolean seen = latest.value() != null;
        long closeAt = WindowClose.closeTime(endMs, allowedLatenessMs);
        if (!seen && WindowClose.isLate(endMs, allowedLatenessMs, ctx.timerService().currentWatermark())) {
            ctx.timerService().registerProcessingTimeTimer(ctx.timerService().currentProcessingTime() + lateArrivalHoldMs);
        } else if (!seen) {
            ctx.timerService().registerEventTimeTimer(closeAt);
        }
        if (WindowClose.isRefire(seen, endMs, ctx.timerService().currentWatermark())) {
            refires.inc();
        }
        latest.update(value);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        Row value = latest.value();
        if (value == null) {
            return;
        }
        long closeAt = WindowClose.closeTime((Long) value.getField(5), allowedLatenessMs);
        if (ctx.timeDomain() == TimeDomain.PROCESSING_TIME) {
            // The end of a late arrival's hold: emitted as if at its close time.
            latest.clear();
            ((TimestampedCollector<Row>) out).setAbsoluteTimestamp(closeAt);
            out.collect(value);
            closed.inc();
            return;
        }
        if (timestamp < closeAt) {
            // Registered under a lower lateness before a restore: the window is still open.
            ctx.timerService().registerEventTimeTimer(closeAt);
            return;
        }
        latest.clear();
        out.collect(value);
        closed.inc();
    }


    /** (tenant, customer, meter, dimensions, window start), joined with a separator no field contains. */
    static final class WindowKey implements KeySelector<Row, String> {
        private static final long serialVersionUID = 1L;

        @Override
        public String getKey(Row row) {
            return row.getField(0) + "\u0000" + row.getField(1) + "\u0000" + row.getField(2) + "\u0000" + row.getField(3) + "\u0000" + row.getField(4);
        }
    }
}
