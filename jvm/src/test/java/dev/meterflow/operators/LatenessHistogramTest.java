package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.HashMap;
import java.util.Map;

import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.SimpleCounter;
import org.apache.flink.metrics.groups.UnregisteredMetricsGroup;
import org.junit.jupiter.api.Test;

/** The lateness histogram's cumulative buckets, the watermark lag, and the re-fire rule. */
class LatenessHistogramTest {
    /** A metric group that keeps what is registered in it. */
    private static final class Capturing extends UnregisteredMetricsGroup {
        final Map<String, Counter> counters = new HashMap<>();

        @Override
        public Counter counter(String name) {
            return counter(name, new SimpleCounter());
        }

        @Override
        public <C extends Counter> C counter(String name, C counter) {
            counters.put(name, counter);
            return counter;
        }
    }

    @Test
    void bucketsAreCumulativeWithInclusiveBounds() {
        Capturing group = new Capturing();
        LatenessHistogram h = new LatenessHistogram(group);
        assertEquals(LatenessHistogram.BUCKETS_MS.length + 1, group.counters.size());
        for (long lateness : new long[] {-5_000, 0, 1, 1_000, 1_001, 45_000, 86_400_000, 86_400_001}) {
            h.record(lateness);
        }
        assertEquals(2, group.counters.get("lateness_le_0").getCount(), "ahead of the watermark, and exactly on it");
        assertEquals(4, group.counters.get("lateness_le_1000").getCount(), "the bound is inclusive");
        assertEquals(5, group.counters.get("lateness_le_5000").getCount());
        assertEquals(5, group.counters.get("lateness_le_30000").getCount());
        assertEquals(6, group.counters.get("lateness_le_60000").getCount());
        assertEquals(7, group.counters.get("lateness_le_86400000").getCount());
        assertEquals(8, group.counters.get("lateness_le_inf").getCount(), "every event");
    }

    @Test
    void firstBucketFindsTheSmallestBoundAtLeastTheLateness() {
        assertEquals(0, LatenessHistogram.firstBucket(Long.MIN_VALUE));
        assertEquals(1, LatenessHistogram.firstBucket(1));
        assertEquals(LatenessHistogram.BUCKETS_MS.length, LatenessHistogram.firstBucket(86_400_001));
    }

    @Test
    void watermarkLagIsNowMinusTheHeldWatermark() {
        assertEquals(0, LatenessMetrics.watermarkLagMs(1_700_000_000_000L, WindowClose.NO_WATERMARK), "no watermark yet");
        assertEquals(65_000, LatenessMetrics.watermarkLagMs(1_700_000_065_000L, 1_700_000_000_000L));
    }

    @Test
    void aRefireIsAnUpdateOnceTheWatermarkPassedTheWindowsEnd() {
        long end = 1_700_000_010_000L;
        assertEquals(false, WindowClose.isRefire(true, end, end - 2), "an early update");
        assertEquals(true, WindowClose.isRefire(true, end, end - 1), "the window fired at end - 1 ms");
        assertEquals(false, WindowClose.isRefire(false, end, end + 5_000), "the first value seen is the first fire");
        assertEquals(false, WindowClose.isRefire(true, end, WindowClose.NO_WATERMARK));
    }
}
