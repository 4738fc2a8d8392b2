package dev.meterflow.stages;

import java.time.Duration;
import java.util.HashMap;
import java.util.Iterator;
import java.util.Map;
import java.util.TreeMap;

import dev.meterflow.operators.HeldWatermark;
import dev.meterflow.operators.LatenessMetrics;
import dev.meterflow.operators.WindowClose;

import org.apache.flink.api.common.state.StateTtlConfig;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.common.operators.ProcessingTimeService.ProcessingTimeCallback;
import org.apache.flink.runtime.state.StateInitializationContext;
import org.apache.flink.runtime.state.StateSnapshotContext;
import org.apache.flink.runtime.state.VoidNamespace;
import org.apache.flink.runtime.state.VoidNamespaceSerializer;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.util.OutputTag;

/**
 * The first stage, keyed by the 128-bit hash of (tenant_id, event_id) ({@link MeteredEvent#idKey}):
 * the only per-event keyed exchange. Per event it
 *
 * <ol>
 *   <li>keeps the first copy of each id (keyed state, one flag per id, forgotten after the dedup
 *       horizon of processing time, as the SQL job's state TTL);
 *   <li>decides lateness against the watermark it holds in operator state, with the same rule as
 *       the SQL job ({@link WindowClose#isLate} with the closed-through boundary): a late event goes
 *       to {@link #LATE} and counts nowhere else;
 *   <li>adds an on-time event to its window's partial, in memory ({@link WindowPartial}).
 * </ol>
 *
 * <p>No aggregate is in this stage's checkpoint: every partial is emitted before each checkpoint
 * barrier ({@code prepareSnapshotPreBarrier}), and the partials of the windows a watermark fires
 * (end - 1 ms at most the watermark) are emitted before that watermark is forwarded, so the second
 * stage has every event of a window before it fires or closes it. Partials are also emitted when
 * {@code maxPartials} windows are open here, or {@link #MAX_HELD_UNIQUE_VALUES} distinct values are held, and every {@code earlyFireMs} of processing time (0:
 * never), so a window's running value is never older than that downstream.
 *
 * <p>At a handover from the other graph ({@code meterflow.handover}) it holds, from the start, the
 * watermark and the closed-through boundary that graph held, and an event that graph read already
 * ({@link MeteredEvent#replayed}) only marks its id unless its window is open here: it goes nowhere else.
 *
 * <p>Its metrics are the classifier's ({@link LatenessMetrics}).
 *
 * <p>The held watermark and the closed-through boundary are kept as {@code LatenessClassifier}
 * keeps them ({@link HeldWatermark}: each subtask takes the highest after a restore or a rescale), and
 * only the held watermark is forwarded: the second stage never sees a watermark this stage did not
 * judge against.
 */
public class DedupAndPartials extends AbstractStreamOperator<PartialWindow> implements OneInputStreamOperator<MeteredEvent, PartialWindow>, ProcessingTimeCallback {
    private static final long serialVersionUID = 1L;

    /**
     * Distinct UNIQUE_COUNT values a subtask holds in its partials before it emits every partial:
     * up to about 250 B each on the heap (a value is at most 128 bytes). The window guard caps each
     * window's at input.max_unique_values; this caps their sum over the windows open here.
     */
    public static final int MAX_HELD_UNIQUE_VALUES = 200_000;

    /** Events judged late: for the late-events topic. */
    public static final OutputTag<LateEvent> LATE = new OutputTag<>("late-events", TypeInformation.of(LateEvent.class));

    private final long windowSizeMs;
    private final long allowedLatenessMs;
    private final Duration dedupHorizon;
    private final Map<String, WindowPartial.Aggregation> aggregations;
    private final int maxPartials;
    private final long earlyFireMs;
    private final long handoverWatermarkMs;
    private final long handoverClosedThroughMs;

    private transient ValueStateDescriptor<Boolean> seenDescriptor;
    private transient ValueState<Boolean> seen;
    private transient HeldWatermark watermark;
    private transient LatenessMetrics metrics;
    /** Open partials by window end, so a watermark emits those it fires without looking at the others. */
    private transient TreeMap<Long, Map<WindowKey, WindowPartial>> partials;
    private transient int open;
    private transient int heldUniqueValues;

    /**
     * @param aggregations each meter's aggregation (meters not named are SUM)
     * @param maxPartials open windows at most before all partials are emitted
     * @param earlyFireMs processing time between emissions of every partial (0: only at barriers, watermarks and the bound)
     */
    public DedupAndPartials(long windowSizeMs, long allowedLatenessMs, Duration dedupHorizon, Map<String, WindowPartial.Aggregation> aggregations, int maxPartials, long earlyFireMs) {
        this(windowSizeMs, allowedLatenessMs, dedupHorizon, aggregations, maxPartials, earlyFireMs, WindowClose.NO_WATERMARK, WindowClose.NOTHING_CLOSED);
    }

    /**
     * @param handoverWatermarkMs at a handover from the other graph, the watermark it held: held from
     *     the start, so every window it closed is closed here too ({@link WindowClose#NO_WATERMARK}: none)
     * @param handoverClosedThroughMs and its closed-through boundary ({@link WindowClose#NOTHING_CLOSED}: none)
     */
    public DedupAndPartials(long windowSizeMs, long allowedLatenessMs, Duration dedupHorizon, Map<String, WindowPartial.Aggregation> aggregations, int maxPartials, long earlyFireMs,
            long handoverWatermarkMs, long handoverClosedThroughMs) {
        if (windowSizeMs <= 0 || allowedLatenessMs < 0 || maxPartials < 1 || earlyFireMs < 0) {
            throw new IllegalArgumentException("window size > 0, allowed lateness >= 0, max partials >= 1 and early fire >= 0");
        }
        this.windowSizeMs = windowSizeMs;
        this.allowedLatenessMs = allowedLatenessMs;
        this.dedupHorizon = dedupHorizon;
        this.aggregations = new HashMap<>(aggregations);
        this.maxPartials = maxPartials;
        this.earlyFireMs = earlyFireMs;
        this.handoverWatermarkMs = handoverWatermarkMs;
        this.handoverClosedThroughMs = handoverClosedThroughMs;
    }

    /** The type of the partials it emits (the second stage's input). */
    public static TypeInformation<PartialWindow> outputType() {
        return TypeInformation.of(PartialWindow.class);
    }

    @Override
    public void initializeState(StateInitializationContext context) throws Exception {
        super.initializeState(context);
        watermark = new HeldWatermark(allowedLatenessMs);
        watermark.initialize(context.getOperatorStateStore());
        watermark.holdAtLeast(handoverWatermarkMs, handoverClosedThroughMs);
    }

    @Override
    public void open() throws Exception {
        super.open();
        seenDescriptor = new ValueStateDescriptor<>("seen", Types.BOOLEAN);
        seenDescriptor.enableTimeToLive(StateTtlConfig.newBuilder(dedupHorizon).cleanupInRocksdbCompactFilter(1000).build());
        seen = getPartitionedState(VoidNamespace.INSTANCE, VoidNamespaceSerializer.INSTANCE, seenDescriptor);
        partials = new TreeMap<>();
        open = 0;
        heldUniqueValues = 0;
        metrics = new LatenessMetrics(getMetricGroup(), () -> watermark.held());
        if (earlyFireMs > 0) {
            long now = getProcessingTimeService().getCurrentProcessingTime();
            getProcessingTimeService().registerTimer(now + earlyFireMs, this);
        }
    }

    /** The watermark lateness is judged against (epoch ms; {@link WindowClose#NO_WATERMARK} before any). */
    public long heldWatermark() {
        return watermark.held();
    }

    @Override
    public void processElement(StreamRecord<MeteredEvent> element) throws Exception {
        MeteredEvent e = element.getValue();
        if (seen.value() != null) {
            return;
        }
        seen.update(Boolean.TRUE);
        WindowKey window = WindowKey.of(e, windowSizeMs);
        long held = watermark.held();
        boolean late = watermark.isLate(window.windowEndMs);
        if (late && e.replayed) {
            // The graph before the handover routed it already, late or counted in a window it closed.
            return;
        }
        metrics.record(late, held, e.eventTimeMs);
        if (late) {
            output.collect(LATE, new StreamRecord<>(new LateEvent(e, window.windowStartMs, window.windowEndMs, held), element.getTimestamp()));
            return;
        }
        Map<WindowKey, WindowPartial> ofEnd = partials.computeIfAbsent(window.windowEndMs, end -> new HashMap<>());
        WindowPartial partial = ofEnd.get(window);
        if (partial == null) {
            partial = new WindowPartial(aggregations.getOrDefault(e.meter, WindowPartial.Aggregation.SUM));
            ofEnd.put(window, partial);
            open++;
        }
        if (partial.add(e.quantity, e.eventTimeMs, e.eventId, e.uniqueValue)) {
            heldUniqueValues++;
        }
        if (open >= maxPartials || heldUniqueValues >= MAX_HELD_UNIQUE_VALUES) {
            emitThrough(Long.MAX_VALUE);
        }
    }

    @Override
    public void processWatermark(Watermark mark) throws Exception {
        if (watermark.advance(mark.getTimestamp())) {
            long held = watermark.held();
            // Windows fire at end - 1 ms: those with end <= held + 1 fire at this watermark.
            emitThrough(held == Long.MAX_VALUE ? Long.MAX_VALUE : held + 1);
            super.processWatermark(new Watermark(held));
        }
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        super.prepareSnapshotPreBarrier(checkpointId);
        emitThrough(Long.MAX_VALUE);
    }

    @Override
    public void snapshotState(StateSnapshotContext context) throws Exception {
        super.snapshotState(context);
        watermark.snapshot();
    }

    @Override
    public void onProcessingTime(long timestamp) throws Exception {
        emitThrough(Long.MAX_VALUE);
        getProcessingTimeService().registerTimer(timestamp + earlyFireMs, this);
    }

    @Override
    public void finish() throws Exception {
        emitThrough(Long.MAX_VALUE);
        super.finish();
    }

    /** Emits and forgets the partials of every window ending at or before {@code endMs}. */
    private void emitThrough(long endMs) {
        Iterator<Map.Entry<Long, Map<WindowKey, WindowPartial>>> ends = partials.headMap(endMs, true).entrySet().iterator();
        while (ends.hasNext()) {
            for (Map.Entry<WindowKey, WindowPartial> p : ends.next().getValue().entrySet()) {
                output.collect(new StreamRecord<>(new PartialWindow(p.getKey(), p.getValue())));
                open--;
                heldUniqueValues -= p.getValue().uniqueValues();
            }
            ends.remove();
        }
    }
}
