package dev.meterflow.operators;

import java.util.function.LongSupplier;

import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.Gauge;
import org.apache.flink.metrics.MetricGroup;

/**
 * The lateness decisions as metrics, the same for every operator that takes them (the SQL graph's
 * {@link LatenessClassifier}, the two-stage graph's first stage), so dashboards and alerts read one set:
 * {@code meterflow.late_records}, {@code meterflow.on_time_records}, {@code meterflow.held_watermark},
 * {@code meterflow.watermark_lag_ms} and the lateness histogram ({@link LatenessHistogram}).
 */
public final class LatenessMetrics {
    private final Counter lateRecords;
    private final Counter onTimeRecords;
    private final LatenessHistogram lateness;

    /** Registers the metrics in the operator's {@code meterflow} group; {@code held} reads the watermark decisions use. */
    public LatenessMetrics(MetricGroup operatorGroup, LongSupplier held) {
        MetricGroup group = operatorGroup.addGroup("meterflow");
        lateRecords = group.counter("late_records");
        onTimeRecords = group.counter("on_time_records");
        group.gauge("held_watermark", (Gauge<Long>) held::getAsLong);
        group.gauge("watermark_lag_ms", (Gauge<Long>) () -> watermarkLagMs(System.currentTimeMillis(), held.getAsLong()));
        lateness = new LatenessHistogram(group);
    }

    /** Counts one decision on an event of {@code eventMs} against the held watermark {@code heldMs}. */
    public void record(boolean late, long heldMs, long eventMs) {
        (late ? lateRecords : onTimeRecords).inc();
        lateness.record(heldMs == WindowClose.NO_WATERMARK ? 0 : heldMs - eventMs);
    }

    /** Wall-clock time minus the held watermark, 0 before any watermark. */
    public static long watermarkLagMs(long nowMs, long heldWatermarkMs) {
        return heldWatermarkMs == WindowClose.NO_WATERMARK ? 0 : nowMs - heldWatermarkMs;
    }
}
