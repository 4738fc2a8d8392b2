package dev.meterflow.source;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.util.ArrayList;
import java.util.List;

import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.util.clock.ManualClock;
import org.junit.jupiter.api.Test;

/** A split is idle after the idle timeout only when it was read up to its head; otherwise after the catch-up timeout. */
class CatchUpIdlenessTest {
    private static final long IDLE_MS = 10_000;
    private static final long CATCH_UP_MS = 60_000;
    private static final long T0 = 1_700_000_000_000L;

    /** What the generator told its output at the last periodic emit. */
    private static final class Recorder implements WatermarkOutput {
        final List<String> calls = new ArrayList<>();

        @Override
        public void emitWatermark(Watermark watermark) {
            calls.add("wm " + watermark.getTimestamp());
        }

        @Override
        public void markIdle() {
            calls.add("idle");
        }

        @Override
        public void markActive() {
            calls.add("active");
        }

        String last() {
            return calls.get(calls.size() - 1);
        }
    }

    /** Emits the largest event time seen at each periodic emit, as the planner's generator does. */
    private static final class MaxSeen implements WatermarkGenerator<RowData> {
        long max = Long.MIN_VALUE;

        @Override
        public void onEvent(RowData event, long eventTimestamp, WatermarkOutput output) {
            max = Math.max(max, eventTimestamp);
        }

        @Override
        public void onPeriodicEmit(WatermarkOutput output) {
            output.emitWatermark(new Watermark(max));
        }
    }

    private final ManualClock activity = new ManualClock(0);
    private final long[] wall = {T0};
    private final Recorder out = new Recorder();
    private final CatchUpIdleness.Generator generator = new CatchUpIdleness.Generator(new MaxSeen(), 0, IDLE_MS, CATCH_UP_MS, activity, () -> wall[0]);

    private void read(long appendedMs, long eventMs) {
        generator.onEvent(GenericRowData.of(TimestampData.fromEpochMillis(appendedMs)), eventMs, out);
    }

    /** Both clocks move on by ms, then a periodic emit. */
    private String after(long ms) {
        activity.advanceTime(java.time.Duration.ofMillis(ms));
        wall[0] += ms;
        generator.onPeriodicEmit(out);
        return out.last();
    }

    @Test
    void aSplitThatHasDeliveredNothingHoldsTheWatermarkUntilTheCatchUpTimeout() {
        assertEquals("wm " + Long.MIN_VALUE, after(IDLE_MS));
        assertEquals("wm " + Long.MIN_VALUE, after(CATCH_UP_MS - IDLE_MS - 1));
        assertEquals("idle", after(1));
    }

    @Test
    void aCaughtUpSplitIsIdleAfterTheIdleTimeout() {
        read(T0 - IDLE_MS, T0 - 20_000);
        assertEquals("wm " + (T0 - 20_000), after(0));
        assertEquals("wm " + (T0 - 20_000), after(IDLE_MS - 1));
        assertEquals("idle", after(1));
    }

    @Test
    void aSplitReadingItsBacklogIsNotIdleAfterTheIdleTimeout() {
        read(T0 - IDLE_MS - 1, T0 - 20_000);
        after(0);
        assertEquals("wm " + (T0 - 20_000), after(IDLE_MS));
        assertEquals("wm " + (T0 - 20_000), after(CATCH_UP_MS - IDLE_MS - 1));
        assertEquals("idle", after(1));
    }

    @Test
    void aSplitThatCatchesUpBecomesIdleAfterTheIdleTimeoutAgain() {
        read(T0 - 3_600_000, T0 - 3_600_000);
        after(0);
        after(5_000);
        long fresh = wall[0] - 5;
        read(fresh, fresh);
        after(0);
        assertEquals("wm " + fresh, after(IDLE_MS - 1));
        assertEquals("idle", after(1));
        read(wall[0] - 1_000_000, wall[0] - 1_000_000);
        assertEquals("wm " + fresh, after(0));
        assertEquals("wm " + fresh, after(IDLE_MS));
    }

    @Test
    void silenceIsMeasuredOnTheActivityClockOnly() {
        read(T0, T0);
        after(0);
        wall[0] += CATCH_UP_MS;
        generator.onPeriodicEmit(out);
        assertEquals("wm " + T0, out.last());
    }

    @Test
    void withoutAnAppendTimeDeliveringIsEnough() {
        CatchUpIdleness.Generator noAppend = new CatchUpIdleness.Generator(new MaxSeen(), -1, IDLE_MS, CATCH_UP_MS, activity, () -> wall[0]);
        noAppend.onEvent(GenericRowData.of((Object) null), T0 - 3_600_000, out);
        noAppend.onPeriodicEmit(out);
        activity.advanceTime(java.time.Duration.ofMillis(IDLE_MS));
        noAppend.onPeriodicEmit(out);
        assertEquals("idle", out.last());
    }

    @Test
    void idlenessOffLeavesThePlannersGenerator() {
        WatermarkStrategy<RowData> planner = ctx -> new MaxSeen();
        assertEquals(MaxSeen.class, new CatchUpIdleness(planner, 0, 0, 0).createWatermarkGenerator(null).getClass());
    }

    @Test
    void theCatchUpTimeoutIsNeverShorterThanTheIdleTimeout() {
        WatermarkStrategy<RowData> planner = ctx -> new MaxSeen();
        assertThrows(IllegalArgumentException.class, () -> new CatchUpIdleness(planner, 0, IDLE_MS, IDLE_MS - 1));
    }
}
