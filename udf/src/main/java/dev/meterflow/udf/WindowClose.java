package dev.meterflow.udf;

/**
 * The close rule, once for the JVM side: a window [start, end) is closed, and an event for it
 * late, once the watermark reaches end - 1 ms + allowed lateness. That is the instant Flink's
 * window operator purges the window (its cleanup time), so the classifier, the closer and the
 * window operator agree. The Python twin is {@code jobs.windowing.window_fires_at_ms}; a test holds the two
 * in step.
 */
public final class WindowClose {
    /** Flink's watermark before any was seen. */
    public static final long NO_WATERMARK = Long.MIN_VALUE;

    private WindowClose() {}

    /** The watermark at which the window ending (exclusive) at {@code windowEndMs} closes. */
    public static long closeTime(long windowEndMs, long allowedLatenessMs) {
        return windowEndMs - 1 + allowedLatenessMs;
    }

    /** Epoch milliseconds of a UTC LocalDateTime, as Flink hands TIMESTAMP(3) values to Java. */
    public static long epochMs(Object utcTime) {
        return ((java.time.LocalDateTime) utcTime).toInstant(java.time.ZoneOffset.UTC).toEpochMilli();
    }

    /** Whether an event of the window ending at {@code windowEndMs} is late under {@code watermarkMs}. */
    public static boolean isLate(long windowEndMs, long allowedLatenessMs, long watermarkMs) {
        return watermarkMs != NO_WATERMARK && watermarkMs >= closeTime(windowEndMs, allowedLatenessMs);
    }

    /**
     * Whether an update of a window already seen is a re-fire: the watermark had reached the window's
     * first firing time (end - 1 ms), so the update comes from an event within the allowed lateness.
     */
    public static boolean isRefire(boolean seenBefore, long windowEndMs, long watermarkMs) {
        return seenBefore && watermarkMs != NO_WATERMARK && watermarkMs >= closeTime(windowEndMs, 0);
    }
}
