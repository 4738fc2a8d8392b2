package dev.meterflow.operators;

import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;

/**
 * Event lateness as fixed cumulative buckets, the way Prometheus histograms count: one counter per
 * bound in {@link #BUCKETS_MS}, {@code lateness_le_<ms>}, counting the events at most that late,
 * and {@code lateness_le_inf} counting all. Bounded: the same eleven series whatever the data.
 *
 * <p>The share of events at most {@code b} ms behind the watermark is
 * {@code rate(lateness_le_<b>) / rate(lateness_le_inf)}; meterflow/metrics_catalog.py lists the
 * same bounds, and docs/operations.md shows how to read them.
 */
public final class LatenessHistogram {
    /** Upper bounds (ms, inclusive) of the buckets, ascending. */
    public static final long[] BUCKETS_MS = {0L, 1_000L, 5_000L, 30_000L, 60_000L, 300_000L, 900_000L, 3_600_000L, 21_600_000L, 86_400_000L};

    private final Counter[] buckets = new Counter[BUCKETS_MS.length];
    private final Counter all;

    /** Registers the counters in {@code group}. */
    public LatenessHistogram(MetricGroup group) {
        for (int i = 0; i < BUCKETS_MS.length; i++) {
            buckets[i] = group.counter("lateness_le_" + BUCKETS_MS[i]);
        }
        all = group.counter("lateness_le_inf");
    }

    /** Index of the smallest bound at least {@code latenessMs} ({@code BUCKETS_MS.length} when none is). */
    public static int firstBucket(long latenessMs) {
        int i = 0;
        while (i < BUCKETS_MS.length && latenessMs > BUCKETS_MS[i]) {
            i++;
        }
        return i;
    }

    /** Counts one event this many milliseconds behind the watermark (negative: ahead of it). */
    public void record(long latenessMs) {
        for (int i = firstBucket(latenessMs); i < buckets.length; i++) {
            buckets[i].inc();
        }
        all.inc();
    }
}
