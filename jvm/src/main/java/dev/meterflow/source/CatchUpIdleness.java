package dev.meterflow.source;

import java.util.function.LongSupplier;

import org.apache.flink.api.common.eventtime.TimestampAssigner;
import org.apache.flink.api.common.eventtime.TimestampAssignerSupplier;
import org.apache.flink.api.common.eventtime.WatermarkAlignmentParams;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkGeneratorSupplier;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.table.data.RowData;
import org.apache.flink.util.clock.RelativeClock;

/**
 * Source idleness that never lets the watermark pass a partition still reading its backlog.
 *
 * <p>Flink's idleness marks a split idle after it has emitted nothing for a timeout, whatever the
 * reason. After a restore, a reader that has not fetched yet looks idle, and the first split to
 * deliver then carries the watermark past the others' backlog: whether those events count or go
 * late depends on fetch timing. Here a split is idle after {@code idleTimeoutMs} of silence only
 * when it was <em>caught up</em>: in the last check interval (Flink's auto-watermark interval) in
 * which it delivered, its first record had been appended (the Kafka record timestamp, the broker's
 * clock on a LogAppendTime topic) at most {@code idleTimeoutMs} before it was read. One record per
 * interval is read for that, not every record: the per-event cost stays the planner's generator. A split that has delivered nothing since the task started, or whose last record was
 * backlog, stops holding the watermark only after {@code catchUpTimeoutMs} of silence, so a
 * reader that stalls for good cannot hold the watermark for ever either.
 *
 * <p>Silence is measured on the input-activity clock Flink hands each split's generator, which does
 * not run while the source is back-pressured or paused; lag is measured on the wall clock.
 */
public final class CatchUpIdleness implements WatermarkStrategy<RowData> {

    private static final long serialVersionUID = 1L;

    private final WatermarkStrategy<RowData> watermarks;
    private final int appendTimeField;
    private final long idleTimeoutMs;
    private final long catchUpTimeoutMs;

    /**
     * @param watermarks the strategy the planner built from the table's WATERMARK clause, without idleness
     * @param appendTimeField position of the Kafka record timestamp ({@code TIMESTAMP_LTZ(3)}) in the source's rows, or -1 when not read
     * @param idleTimeoutMs silence after which a caught-up split is idle; 0 turns idleness off
     * @param catchUpTimeoutMs silence after which any split is idle; at least {@code idleTimeoutMs}
     */
    public CatchUpIdleness(WatermarkStrategy<RowData> watermarks, int appendTimeField, long idleTimeoutMs, long catchUpTimeoutMs) {
        if (idleTimeoutMs < 0 || catchUpTimeoutMs < idleTimeoutMs) {
            throw new IllegalArgumentException("need 0 <= idle timeout <= catch-up timeout, got " + idleTimeoutMs + " ms and " + catchUpTimeoutMs + " ms");
        }
        this.watermarks = watermarks;
        this.appendTimeField = appendTimeField;
        this.idleTimeoutMs = idleTimeoutMs;
        this.catchUpTimeoutMs = catchUpTimeoutMs;
    }

    @Override
    public WatermarkGenerator<RowData> createWatermarkGenerator(WatermarkGeneratorSupplier.Context context) {
        WatermarkGenerator<RowData> inner = watermarks.createWatermarkGenerator(context);
        if (idleTimeoutMs == 0) {
            return inner;
        }
        return new Generator(inner, appendTimeField, idleTimeoutMs, catchUpTimeoutMs, context.getInputActivityClock(), System::currentTimeMillis);
    }

    @Override
    public TimestampAssigner<RowData> createTimestampAssigner(TimestampAssignerSupplier.Context context) {
        return watermarks.createTimestampAssigner(context);
    }

    @Override
    public WatermarkAlignmentParams getAlignmentParameters() {
        return watermarks.getAlignmentParameters();
    }

    /** One split's generator: the planner's watermarks, marked idle by the rule above. */
    static final class Generator implements WatermarkGenerator<RowData> {
        private final WatermarkGenerator<RowData> inner;
        private final int appendTimeField;
        private final long idleTimeoutMs;
        private final long catchUpTimeoutMs;
        private final RelativeClock activityClock;
        private final LongSupplier wallClock;

        private long lastActivityMs;
        private boolean deliveredSinceCheck;
        private long intervalAppendMs = Long.MIN_VALUE;
        private boolean caughtUp;

        Generator(WatermarkGenerator<RowData> inner, int appendTimeField, long idleTimeoutMs, long catchUpTimeoutMs, RelativeClock activityClock, LongSupplier wallClock) {
            this.inner = inner;
            this.appendTimeField = appendTimeField;
            this.idleTimeoutMs = idleTimeoutMs;
            this.catchUpTimeoutMs = catchUpTimeoutMs;
            this.activityClock = activityClock;
            this.wallClock = wallClock;
            this.lastActivityMs = activityClock.relativeTimeMillis();
        }

        @Override
        public void onEvent(RowData row, long eventTimestamp, WatermarkOutput output) {
            if (!deliveredSinceCheck) {
                deliveredSinceCheck = true;
                if (appendTimeField >= 0 && !row.isNullAt(appendTimeField)) {
                    intervalAppendMs = row.getTimestamp(appendTimeField, 3).getMillisecond();
                }
            }
            inner.onEvent(row, eventTimestamp, output);
        }

        @Override
        public void onPeriodicEmit(WatermarkOutput output) {
            long now = activityClock.relativeTimeMillis();
            if (deliveredSinceCheck) {
                // Read since the last check (one auto-watermark interval): the lag of the interval's first
                // record says whether the split was at its head. Without an append time, delivering is enough.
                deliveredSinceCheck = false;
                lastActivityMs = now;
                caughtUp = appendTimeField < 0 || intervalAppendMs == Long.MIN_VALUE || wallClock.getAsLong() - intervalAppendMs <= idleTimeoutMs;
            }
            long silentMs = now - lastActivityMs;
            if (silentMs >= (caughtUp ? idleTimeoutMs : catchUpTimeoutMs)) {
                output.markIdle();
            } else {
                inner.onPeriodicEmit(output);
            }
        }
    }
}
