package dev.meterflow.operators;

import java.util.ArrayList;
import java.util.List;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.api.common.operators.ProcessingTimeService.ProcessingTimeCallback;
import org.apache.flink.types.Row;

/**
 * Gathers a subtask's rows into batches of at most {@code maxRows}, so a Python operator after it
 * receives one element per batch: PyFlink's per-element hand-over (Beam's decoding, a coroutine
 * started across threads, a result future, the emitter thread) is paid once per batch instead of
 * once per row.
 *
 * <p>A batch is emitted when it is full, {@code maxDelayMs} of processing time after its first row,
 * before each checkpoint barrier ({@code prepareSnapshotPreBarrier}) and before each watermark.
 * Nothing is held across a barrier, so the operator has no state: every row it took is either in a
 * batch emitted before the barrier, or read again from the source after a restore.
 *
 * <p>Applied right after a keyBy, the batches of a subtask hold only the keys that subtask owns, and
 * a forward connection keeps them there; within a batch the rows keep their arrival order.
 * Output rows: one field, {@code rows}, an array of the input rows ({@link #outputType}).
 */
public class RowBatcher extends AbstractStreamOperator<Row> implements OneInputStreamOperator<Row, Row>, ProcessingTimeCallback {
    private static final long serialVersionUID = 1L;

    private final int maxRows;
    private final long maxDelayMs;
    private transient List<Row> pending;
    private transient boolean timerSet;

    public RowBatcher(int maxRows, long maxDelayMs) {
        if (maxRows < 1 || maxDelayMs < 0) {
            throw new IllegalArgumentException("a batch holds at least one row and waits no negative time: " + maxRows + ", " + maxDelayMs);
        }
        this.maxRows = maxRows;
        this.maxDelayMs = maxDelayMs;
    }

    /** The type of a batch: one field {@code rows}, an array of rows of {@code rowType}. */
    @SuppressWarnings("unchecked")
    public static TypeInformation<Row> outputType(TypeInformation<Row> rowType) {
        return Types.ROW_NAMED(new String[] {"rows"}, Types.OBJECT_ARRAY(rowType));
    }

    @Override
    public void open() throws Exception {
        super.open();
        pending = new ArrayList<>(maxRows);
    }

    @Override
    public void processElement(StreamRecord<Row> element) throws Exception {
        pending.add(element.getValue());
        if (pending.size() >= maxRows) {
            flush();
        } else if (!timerSet) {
            timerSet = true;
            long now = getProcessingTimeService().getCurrentProcessingTime();
            getProcessingTimeService().registerTimer(now + maxDelayMs, this);
        }
    }

    @Override
    public void onProcessingTime(long timestamp) {
        timerSet = false;
        flush();
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        super.prepareSnapshotPreBarrier(checkpointId);
        flush();
    }

    @Override
    public void processWatermark(Watermark mark) throws Exception {
        flush();
        super.processWatermark(mark);
    }

    @Override
    public void finish() throws Exception {
        flush();
        super.finish();
    }

    private void flush() {
        if (pending.isEmpty()) {
            return;
        }
        output.collect(new StreamRecord<>(Row.of((Object) pending.toArray(new Row[0]))));
        pending = new ArrayList<>(maxRows);
    }
}
