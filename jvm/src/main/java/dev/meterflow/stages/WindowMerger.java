package dev.meterflow.stages;

import dev.meterflow.operators.WindowClose;
import dev.meterflow.operators.WindowCloser;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.metrics.Counter;
import org.apache.flink.streaming.api.TimeDomain;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.operators.TimestampedCollector;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * The second stage, keyed by window ({@link WindowKey#selector}): merges the first stage's partials
 * into the window's state (touched once per partial, not per event), and emits
 *
 * <ul>
 *   <li>its final row, on the main output, when the watermark reaches its close time
 *       ({@link WindowClose#closeTime}), stamped with that time: for the window table's final row
 *       and the closed-windows topic;
 *   <li>its provisional row, on {@link #FIRES}, when the watermark reaches its end - 1 ms (the
 *       first fire), and again on each partial that arrives after that and before its close (a
 *       re-fire within the allowed lateness), and, with early rows on, on each partial before the
 *       first fire: for the window table's provisional rows.
 * </ul>
 *
 * <p>Rows have the closer's type ({@link WindowCloser#outputType()}): the window bounds as epoch
 * ms, the quantity as an exact decimal string, the event count, and the revision (the event count:
 * every update adds at least one event, so the sink can refuse an older row replayed after a restore).
 *
 * <p>A window's partials come from every first-stage subtask. One whose input was idle while the
 * others carried the watermark on can hand over a partial after the window closed here. Such a
 * partial is merged and the window is emitted as final again after {@code lateArrivalHoldMs} of
 * processing time (what follows it on the same channel comes with it), with every event it has and
 * a higher revision (billing turns a changed final into a correction). For that, a closed window's
 * state is kept for {@code retainClosedMs} of processing time after its final row. A window first
 * seen after its close time is held and emitted the same way. A partial arriving after the
 * retention for a window closed before is the one case this cannot tell from a window never seen:
 * its final would hold only the later events, so the retention must outlast the source's idle and
 * catch-up timeouts.
 *
 * <p>A close timer registered under a lower allowed lateness before a restore moves to the close
 * time under the current one; a window that gets a partial after a restore, before the first
 * watermark, fires (again) at that watermark.
 */
public class WindowMerger extends KeyedProcessFunction<String, PartialWindow, Row> {
    private static final long serialVersionUID = 1L;

    /** Each window's provisional rows: the first fire and the re-fires within the allowed lateness. */
    public static final OutputTag<Row> FIRES = new OutputTag<>("window-fires", WindowCloser.outputType());

    private final long allowedLatenessMs;
    private final long lateArrivalHoldMs;
    private final long retainClosedMs;
    private final boolean earlyRows;
    private transient ValueState<WindowPartial> merged;
    private transient ValueState<WindowKey> window;
    /** Processing time of the pending final of a window closed or first seen after its close; null if none. */
    private transient ValueState<Long> finalDueAt;
    /** Processing time at which a closed window's state goes; null while it is open. */
    private transient ValueState<Long> forgetAt;
    private transient Counter refires;
    private transient Counter refinals;
    private transient Counter closed;

    public WindowMerger(long allowedLatenessMs, long lateArrivalHoldMs, long retainClosedMs) {
        this(allowedLatenessMs, lateArrivalHoldMs, retainClosedMs, false);
    }

    /** With {@code earlyRows}, a window's provisional row also goes out on each partial before its first fire (the early fires). */
    public WindowMerger(long allowedLatenessMs, long lateArrivalHoldMs, long retainClosedMs, boolean earlyRows) {
        if (allowedLatenessMs < 0 || lateArrivalHoldMs < 0 || retainClosedMs <= lateArrivalHoldMs) {
            throw new IllegalArgumentException("lateness and hold >= 0, and closed windows retained longer than the hold");
        }
        this.allowedLatenessMs = allowedLatenessMs;
        this.lateArrivalHoldMs = lateArrivalHoldMs;
        this.retainClosedMs = retainClosedMs;
        this.earlyRows = earlyRows;
    }

    /** The type of the rows it emits, finals and fires alike. */
    public static TypeInformation<Row> outputType() {
        return WindowCloser.outputType();
    }

    @Override
    public void open(OpenContext openContext) {
        merged = getRuntimeContext().getState(new ValueStateDescriptor<>("window-partial", new WindowPartialTypeInfo()));
        window = getRuntimeContext().getState(new ValueStateDescriptor<>("window-key", TypeInformation.of(WindowKey.class)));
        finalDueAt = getRuntimeContext().getState(new ValueStateDescriptor<>("final-due-at", Types.LONG));
        forgetAt = getRuntimeContext().getState(new ValueStateDescriptor<>("forget-at", Types.LONG));
        var group = getRuntimeContext().getMetricGroup().addGroup("meterflow");
        refires = group.counter("window_refires");
        refinals = group.counter("window_refinals");
        closed = group.counter("windows_closed");
    }

    @Override
    public void processElement(PartialWindow in, Context ctx, Collector<Row> out) throws Exception {
        WindowPartial value = merged.value();
        long watermark = ctx.timerService().currentWatermark();
        long endMs = in.key.windowEndMs;
        boolean seen = value != null;
        boolean fired = watermark != WindowClose.NO_WATERMARK && watermark >= WindowClose.closeTime(endMs, 0);
        boolean closed = forgetAt.value() != null || WindowClose.isLate(endMs, allowedLatenessMs, watermark);
        if (!seen) {
            value = new WindowPartial(in.partial.aggregation());
            window.update(in.key);
        }
        value.merge(in.partial);
        merged.update(value);
        if (closed) {
            // Closed here, or first seen after its close: final (again) once the hold has gathered what follows.
            if (finalDueAt.value() == null) {
                long due = ctx.timerService().currentProcessingTime() + lateArrivalHoldMs;
                finalDueAt.update(due);
                ctx.timerService().registerProcessingTimeTimer(due);
            }
            return;
        }
        if (!fired) {
            // Also after a restore, before the first watermark: the window fires at the watermark that reaches it.
            ctx.timerService().registerEventTimeTimer(WindowClose.closeTime(endMs, 0));
        }
        ctx.timerService().registerEventTimeTimer(WindowClose.closeTime(endMs, allowedLatenessMs));
        if (fired) {
            // Within the allowed lateness: the window's row again, with the events it gained.
            if (seen) {
                refires.inc();
            }
            ctx.output(FIRES, row(in.key, value));
        } else if (earlyRows) {
            ctx.output(FIRES, row(in.key, value));
        }
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        WindowPartial value = merged.value();
        if (value == null) {
            return;
        }
        WindowKey key = window.value();
        long closeAt = WindowClose.closeTime(key.windowEndMs, allowedLatenessMs);
        if (ctx.timeDomain() == TimeDomain.PROCESSING_TIME) {
            Long due = finalDueAt.value();
            if (due != null && timestamp == due) {
                if (forgetAt.value() != null) {
                    refinals.inc();
                }
                finalDueAt.clear();
                emitFinal(key, value, closeAt, ctx, out);
            } else if (due == null && Long.valueOf(timestamp).equals(forgetAt.value())) {
                merged.clear();
                window.clear();
                forgetAt.clear();
            }
            return;
        }
        if (forgetAt.value() != null) {
            return; // closed already; a timer from before a restore
        }
        if (timestamp < closeAt) {
            if (timestamp == WindowClose.closeTime(key.windowEndMs, 0)) {
                ctx.output(FIRES, row(key, value)); // the first fire
            }
            // Registered again (a timer is kept once per time): a close registered under a lower
            // lateness before a restore moves to the close time under the current one.
            ctx.timerService().registerEventTimeTimer(closeAt);
            return;
        }
        if (timestamp == WindowClose.closeTime(key.windowEndMs, 0)) {
            ctx.output(FIRES, row(key, value)); // no allowed lateness: fired and closed at once
        }
        emitFinal(key, value, closeAt, ctx, out);
    }

    private void emitFinal(WindowKey key, WindowPartial value, long closeAt, OnTimerContext ctx, Collector<Row> out) throws Exception {
        ((TimestampedCollector<Row>) out).setAbsoluteTimestamp(closeAt);
        out.collect(row(key, value));
        closed.inc();
        long forget = ctx.timerService().currentProcessingTime() + retainClosedMs;
        forgetAt.update(forget);
        ctx.timerService().registerProcessingTimeTimer(forget);
    }

    static Row row(WindowKey key, WindowPartial value) {
        return Row.of(key.tenantId, key.customerId, key.meter, key.dimensionsKey, key.windowStartMs, key.windowEndMs, value.value().toPlainString(), value.eventCount(), value.eventCount());
    }
}
