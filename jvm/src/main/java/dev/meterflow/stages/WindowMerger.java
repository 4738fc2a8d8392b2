package dev.meterflow.stages;

import dev.meterflow.operators.WindowClose;
import dev.meterflow.operators.WindowCloser;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.metrics.Counter;
import org.apache.flink.streaming.api.TimeDomain;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * The second stage, keyed by window ({@link WindowKey#selector}): merges the first stage's partials
 * into the window's state (touched once per partial, not per event), and emits
 *
 * <ul>
 *   <li>the window's row when the watermark reaches its end - 1 ms (the first fire), and again on
 *       each partial that arrives after that and before its close (a re-fire within the allowed
 *       lateness): the main output, for the window table's provisional rows;
 *   <li>its final row once, when the watermark reaches its close time ({@link WindowClose#closeTime}):
 *       {@link #FINAL}, for the window table's final row and the closed-windows topic.
 * </ul>
 *
 * <p>Rows have the closer's type ({@link WindowCloser#outputType()}): the window bounds as epoch
 * ms, the quantity as an exact decimal string, the event count, and the revision (the event count:
 * every update adds at least one event, so the sink can refuse an older row replayed after a restore).
 *
 * <p>The closer's two rules hold here too. A window whose first partial arrives after its close
 * time (a first-stage subtask whose input was idle while the others carried the watermark on) is
 * held for {@code lateArrivalHoldMs} of processing time to gather what follows it, then emitted as
 * final. A close timer registered under a lower allowed lateness before a restore moves to the
 * close time under the current one.
 */
public class WindowMerger extends KeyedProcessFunction<String, PartialWindow, Row> {
    private static final long serialVersionUID = 1L;

    /** Each window's final row, once. */
    public static final OutputTag<Row> FINAL = new OutputTag<>("final-windows", WindowCloser.outputType());

    private final long allowedLatenessMs;
    private final long lateArrivalHoldMs;
    private transient ValueState<WindowPartial> merged;
    private transient ValueState<WindowKey> window;
    private transient Counter refires;

    public WindowMerger(long allowedLatenessMs, long lateArrivalHoldMs) {
        this.allowedLatenessMs = allowedLatenessMs;
        this.lateArrivalHoldMs = lateArrivalHoldMs;
    }

    /** The type of the rows it emits, fires and finals alike. */
    public static TypeInformation<Row> outputType() {
        return WindowCloser.outputType();
    }

    @Override
    public void open(OpenContext openContext) {
        merged = getRuntimeContext().getState(new ValueStateDescriptor<>("window-partial", WindowPartialSerializer.INSTANCE));
        window = getRuntimeContext().getState(new ValueStateDescriptor<>("window-key", TypeInformation.of(WindowKey.class)));
        refires = getRuntimeContext().getMetricGroup().addGroup("meterflow").counter("window_refires");
    }

    @Override
    public void processElement(PartialWindow in, Context ctx, Collector<Row> out) throws Exception {
        WindowPartial value = merged.value();
        long watermark = ctx.timerService().currentWatermark();
        long endMs = in.key.windowEndMs;
        boolean seen = value != null;
        boolean fired = watermark != WindowClose.NO_WATERMARK && watermark >= WindowClose.closeTime(endMs, 0);
        boolean closed = WindowClose.isLate(endMs, allowedLatenessMs, watermark);
        if (!seen) {
            value = new WindowPartial(in.partial.aggregation());
            window.update(in.key);
            if (closed) {
                ctx.timerService().registerProcessingTimeTimer(ctx.timerService().currentProcessingTime() + lateArrivalHoldMs);
            } else {
                if (!fired) {
                    ctx.timerService().registerEventTimeTimer(WindowClose.closeTime(endMs, 0));
                }
                ctx.timerService().registerEventTimeTimer(WindowClose.closeTime(endMs, allowedLatenessMs));
            }
        }
        value.merge(in.partial);
        merged.update(value);
        if (fired && !closed) {
            // Within the allowed lateness: the window's row again, with the events it gained.
            if (seen) {
                refires.inc();
            }
            out.collect(row(in.key, value));
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
            emitFinal(key, value, ctx); // the end of a late arrival's hold: final, as if at its close time
            return;
        }
        if (timestamp < closeAt) {
            if (timestamp == WindowClose.closeTime(key.windowEndMs, 0)) {
                out.collect(row(key, value)); // the first fire
            }
            // Registered again (a timer is kept once per time): a close registered under a lower
            // lateness before a restore moves to the close time under the current one.
            ctx.timerService().registerEventTimeTimer(closeAt);
            return;
        }
        if (timestamp == WindowClose.closeTime(key.windowEndMs, 0)) {
            out.collect(row(key, value)); // no allowed lateness: fired and closed at once
        }
        emitFinal(key, value, ctx);
    }

    private void emitFinal(WindowKey key, WindowPartial value, OnTimerContext ctx) {
        merged.clear();
        window.clear();
        ctx.output(FINAL, row(key, value));
    }

    static Row row(WindowKey key, WindowPartial value) {
        return Row.of(key.tenantId, key.customerId, key.meter, key.dimensionsKey, key.windowStartMs, key.windowEndMs, value.value().toPlainString(), value.eventCount(), value.eventCount());
    }
}
