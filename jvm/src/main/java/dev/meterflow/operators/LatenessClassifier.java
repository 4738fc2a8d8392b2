package dev.meterflow.operators;

import java.util.ArrayList;
import java.util.List;

import org.apache.flink.runtime.state.StateInitializationContext;
import org.apache.flink.runtime.state.StateSnapshotContext;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.ChainingStrategy;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.api.transformations.OneInputTransformation;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.data.utils.JoinedRowData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.BigIntType;
import org.apache.flink.table.types.logical.BooleanType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.TimestampType;

/**
 * Decides once per unique event whether it is late, with a watermark that survives a restore.
 *
 * <p>Flink does not checkpoint watermarks: after a failover or a restart from a savepoint every
 * operator starts again from "no watermark" until the sources have re-read enough data. A
 * decision that only read the live watermark would then call on time an event whose window the
 * window operator had already purged before the checkpoint, and the event would vanish (the
 * recreated window's row is older than the final one). This operator keeps the highest watermark
 * it has seen in operator state and classifies against max(held, live).
 *
 * <p>Why that is safe: the window operator downstream only ever sees watermarks this operator
 * forwarded, so its watermark is at most the held one. "On time" here therefore means the window
 * is still open downstream, before and after a restore. On restore with changed parallelism each
 * subtask takes the maximum over all subtasks' held watermarks: a higher watermark can only make
 * an event late earlier (it goes to the late topic, consistently), never lose it.
 *
 * <p>The allowed lateness may change between a savepoint and the job resubmitted from it. The
 * operator also keeps the closed-through boundary ({@link WindowClose#closedThrough}): the highest
 * window end it has judged closed, under the lateness in force at the time. An event is late if
 * its window is closed under the current lateness or its end is at most that boundary, so a raised
 * lateness never reopens a window whose final value was already written and published (the window
 * operator purged it, the closer emitted it). A lowered lateness closes windows at once; the
 * events they counted stay counted. Savepoints without the boundary restore with none: it starts
 * from the held watermark under the new lateness.
 *
 * <p>Rows stay in Flink's internal format ({@link RowData}) from the query before the classifier to
 * the queries after it: converting every record to an external {@code Row} and back cost more than
 * the decision. Each output row is the input row followed by {@link #DECISION_COLUMNS}.
 *
 * <p>Rows without a window end (rejected records travelling in the same stream) get NULL decision
 * columns.
 *
 * <p>Metrics: {@code meterflow.late_records} and {@code meterflow.on_time_records}, the decisions
 * taken (the late rate is late / (late + on time)), and {@code meterflow.held_watermark}, the
 * watermark they are taken against (epoch ms; it stands still while the event time does).
 * {@code meterflow.watermark_lag_ms} is wall-clock now minus the held watermark (0 before the
 * first watermark). The lateness histogram is one cumulative counter per bucket of
 * {@link LatenessHistogram#BUCKETS_MS}, {@code meterflow.lateness_le_<ms>}, plus {@code meterflow.lateness_le_inf}:
 * the events whose lateness (held watermark - event time, the {@code lateness_ms} of the late-events
 * topic) is at most that many milliseconds, as Prometheus' {@code le} buckets count. An event seen
 * before any watermark counts as lateness 0.
 */
public class LatenessClassifier extends AbstractStreamOperator<RowData> implements OneInputStreamOperator<RowData, RowData> {
    private static final long serialVersionUID = 1L;

    /** What the classifier appends to each row: the held watermark, its distance to the event time, the decision. */
    public static final List<String> DECISION_COLUMNS = List.of("watermark", "lateness_ms", "is_late");

    private final int eventTimeField;
    private final int windowEndField;
    private final long allowedLatenessMs;

    private transient HeldWatermark watermark;
    private transient LatenessMetrics metrics;

    /** Field positions in the routed row of the event time and the window end (both TIMESTAMP(3)), and the allowed lateness of the window operator. */
    public LatenessClassifier(int eventTimeField, int windowEndField, long allowedLatenessMs) {
        this.eventTimeField = eventTimeField;
        this.windowEndField = windowEndField;
        this.allowedLatenessMs = allowedLatenessMs;
    }

    /** The type of the classifier's output: the input's columns, then {@link #DECISION_COLUMNS}. */
    public static RowType outputType(RowType input) {
        List<RowType.RowField> fields = new ArrayList<>(input.getFields());
        fields.add(new RowType.RowField(DECISION_COLUMNS.get(0), new TimestampType(3)));
        fields.add(new RowType.RowField(DECISION_COLUMNS.get(1), new BigIntType()));
        fields.add(new RowType.RowField(DECISION_COLUMNS.get(2), new BooleanType()));
        return new RowType(fields);
    }

    /** Adds the classifier after {@code input}, chained to it, with a stable uid. */
    public static SingleOutputStreamOperator<RowData> apply(DataStream<RowData> input, RowType inputType, LatenessClassifier classifier, String name, String uid) {
        SingleOutputStreamOperator<RowData> out = input.transform(name, InternalTypeInfo.of(outputType(inputType)), classifier).uid(uid);
        ((OneInputTransformation<?, ?>) out.getTransformation()).setChainingStrategy(ChainingStrategy.ALWAYS);
        return out;
    }

    /** The watermark decisions use now: the live one, never below what was seen before a restore. */
    public long effectiveWatermark() {
        return watermark.held();
    }

    @Override
    public void open() throws Exception {
        super.open();
        metrics = new LatenessMetrics(getMetricGroup(), () -> watermark.held());
    }

    @Override
    public void initializeState(StateInitializationContext context) throws Exception {
        super.initializeState(context);
        watermark = new HeldWatermark(allowedLatenessMs);
        watermark.initialize(context.getOperatorStateStore());
    }

    /** The highest window end judged closed so far (epoch ms), {@link WindowClose#NOTHING_CLOSED} before any. */
    public long closedThrough() {
        return watermark.closedThrough();
    }

    @Override
    public void snapshotState(StateSnapshotContext context) throws Exception {
        super.snapshotState(context);
        watermark.snapshot();
    }

    @Override
    public void processWatermark(Watermark mark) throws Exception {
        // Forward the held watermark: after a restore the window operator and the closer get back
        // to where they were (windows re-fire, timers fire) as soon as the sources emit again,
        // instead of waiting for newer data than the checkpoint had seen.
        if (watermark.advance(mark.getTimestamp())) {
            super.processWatermark(new Watermark(watermark.held()));
        }
    }

    @Override
    public void processElement(StreamRecord<RowData> element) throws Exception {
        RowData row = element.getValue();
        GenericRowData decision = new GenericRowData(DECISION_COLUMNS.size());
        if (!row.isNullAt(windowEndField)) {
            long endMs = row.getTimestamp(windowEndField, 3).getMillisecond();
            long eventMs = row.getTimestamp(eventTimeField, 3).getMillisecond();
            long held = watermark.held();
            boolean late = watermark.isLate(endMs);
            if (held != WindowClose.NO_WATERMARK) {
                decision.setField(0, TimestampData.fromEpochMillis(held));
                decision.setField(1, held - eventMs);
            }
            decision.setField(2, late);
            metrics.record(late, held, eventMs);
        }
        // The joined row wraps the upstream's row, which the upstream reuses for its next record
        // (object reuse): every consumer in the chain is done with it before then.
        JoinedRowData out = new JoinedRowData(row.getRowKind(), row, decision);
        output.collect(element.replace(out));
    }
}
