package dev.meterflow.operators;

/**
 * The close rule, once for the JVM side: a window [start, end) is closed, and an event for it
 * late, once the watermark reaches end - 1 ms + allowed lateness. That is the instant Flink's
 * window operator purges the window (its cleanup time), so the classifier, the closer and the
 * window operator agree. The Python twin is {@code meterflow.windowing.window_fires_at_ms}; a test holds the two
 * in step.
 */
public final class WindowClose {
    /** Flink's watermark before any was seen. */
    public static final long NO_WATERMARK = Long.MIN_VALUE;

    /** The closed-through boundary before any window was judged closed. */
    public static final long NOTHING_CLOSED = Long.MIN_VALUE;

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
     * The closed-through boundary after a watermark: the highest window end judged closed so far,
     * {@code previous} or the highest end closed at {@code watermarkMs} under the lateness in force
     * now (end - 1 ms + lateness &lt;= watermark, that is end &lt;= watermark - lateness + 1 ms),
     * whichever is higher. Kept across restores, it keeps a window closed before a savepoint closed
     * after one whatever the new allowed lateness. Twin of {@code meterflow.windowing.closed_through_ms}.
     */
    public static long closedThrough(long previous, long watermarkMs, long allowedLatenessMs) {
        if (watermarkMs == NO_WATERMARK) {
            return previous;
        }
        long closedEnd = watermarkMs - allowedLatenessMs;
        // The end-of-input watermark (Long.MAX_VALUE) with no lateness closes everything: no overflow past it.
        return Math.max(previous, closedEnd == Long.MAX_VALUE ? Long.MAX_VALUE : closedEnd + 1);
    }

    /**
     * Whether an event of the window ending at {@code windowEndMs} is late: its window is closed
     * under the lateness in force, or it was closed before (its end is at most {@code closedThroughMs}).
     * Twin of {@code meterflow.windowing.is_late}.
     */
    public static boolean isLate(long windowEndMs, long allowedLatenessMs, long watermarkMs, long closedThroughMs) {
        return isLate(windowEndMs, allowedLatenessMs, watermarkMs) || (closedThroughMs != NOTHING_CLOSED && windowEndMs <= closedThroughMs);
    }

    /**
     * Whether an update of a window already seen is a re-fire: the watermark had reached the window's
     * first firing time (end - 1 ms), so the update comes from an event within the allowed lateness.
     */
    public static boolean isRefire(boolean seenBefore, long windowEndMs, long watermarkMs) {
        return seenBefore && watermarkMs != NO_WATERMARK && watermarkMs >= closeTime(windowEndMs, 0);
    }
}
