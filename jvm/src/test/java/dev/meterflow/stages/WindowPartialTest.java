package dev.meterflow.stages;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;

import dev.meterflow.stages.WindowPartial.Aggregation;

import org.apache.flink.core.memory.DataInputDeserializer;
import org.apache.flink.core.memory.DataOutputSerializer;
import org.junit.jupiter.api.Test;

class WindowPartialTest {
    private record Event(BigDecimal quantity, long timeMs, String id, String unique) {}

    private static List<Event> events(int n, long seed) {
        Random r = new Random(seed);
        List<Event> out = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            BigDecimal q = BigDecimal.valueOf(r.nextLong() % 1_000_000_000_000L, 9).abs();
            // Ids are unique, as after the dedup; times collide, so LATEST's tie-break on the id decides.
            out.add(new Event(q, 1_000 + r.nextInt(5), "e" + r.nextInt(1_000) + "-" + i, r.nextInt(4) == 0 ? null : "u" + r.nextInt(7)));
        }
        return out;
    }

    private static WindowPartial of(Aggregation a, List<Event> events) {
        WindowPartial p = new WindowPartial(a);
        for (Event e : events) {
            p.add(e.quantity, e.timeMs, e.id, e.unique);
        }
        return p;
    }

    @Test
    void mergingPartialsInAnyGroupingGivesTheValueOfAllTheEventsAtOnce() {
        List<Event> all = events(500, 7);
        for (Aggregation a : Aggregation.values()) {
            WindowPartial whole = of(a, all);
            for (long seed = 0; seed < 5; seed++) {
                // Partials of a random grouping of the events, merged in a random order.
                List<Event> shuffled = new ArrayList<>(all);
                java.util.Collections.shuffle(shuffled, new Random(seed));
                List<WindowPartial> parts = new ArrayList<>();
                for (int from = 0; from < shuffled.size(); from += 1 + (int) (seed * 17 % 50)) {
                    parts.add(of(a, shuffled.subList(from, Math.min(shuffled.size(), from + 1 + (int) (seed * 17 % 50)))));
                }
                java.util.Collections.shuffle(parts, new Random(seed + 100));
                WindowPartial merged = new WindowPartial(a);
                parts.forEach(merged::merge);
                assertEquals(whole.value(), merged.value(), a.name() + " seed " + seed);
                assertEquals(500, merged.eventCount(), a.name());
            }
        }
    }

    @Test
    void eachAggregationIsTheSqlJobs() {
        List<Event> e = List.of(
            new Event(new BigDecimal("1.5"), 10, "b", "x"),
            new Event(new BigDecimal("7"), 20, "a", "y"),
            new Event(new BigDecimal("2.25"), 20, "a|b", null),
            new Event(new BigDecimal("3"), 5, "z", "x"));
        assertEquals(new BigDecimal("13.750000000"), of(Aggregation.SUM, e).value());
        assertEquals(new BigDecimal("4.000000000"), of(Aggregation.COUNT, e).value());
        assertEquals(new BigDecimal("7.000000000"), of(Aggregation.MAX, e).value());
        // Greatest time, then the greatest id: "a|b" sorts after "a".
        assertEquals(new BigDecimal("2.250000000"), of(Aggregation.LATEST, e).value());
        // A missing value is not a value.
        assertEquals(new BigDecimal("2.000000000"), of(Aggregation.UNIQUE_COUNT, e).value());
    }

    @Test
    void aSumPastTheLongStaysExact() {
        WindowPartial p = new WindowPartial(Aggregation.SUM);
        BigDecimal big = new BigDecimal("999999999999999.999999999"); // the input contract's bound, less a unit
        for (int i = 0; i < 50; i++) {
            p.add(big, 0, "e" + i, null);
        }
        WindowPartial q = new WindowPartial(Aggregation.SUM);
        q.add(new BigDecimal("9223372036.854775807"), 0, "x", null); // Long.MAX_VALUE unscaled
        q.add(new BigDecimal("0.000000001"), 0, "y", null); // one past it
        p.merge(q);
        assertEquals(big.multiply(BigDecimal.valueOf(50)).add(new BigDecimal("9223372036.854775808")).setScale(9), p.value());
    }

    @Test
    void negativeQuantitiesOverflowNeitherWay() {
        WindowPartial p = new WindowPartial(Aggregation.SUM);
        p.add(new BigDecimal("-9223372036.854775808"), 0, "a", null); // Long.MIN_VALUE unscaled
        p.add(new BigDecimal("-0.000000001"), 0, "b", null);
        assertEquals(new BigDecimal("-9223372036.854775809"), p.value());
    }

    @Test
    void partialsOfDifferentAggregationsDoNotMerge() {
        assertThrows(IllegalArgumentException.class, () -> new WindowPartial(Aggregation.SUM).merge(new WindowPartial(Aggregation.MAX)));
    }

    @Test
    void theSerializerRestoresEveryAggregationExactly() throws Exception {
        List<Event> all = events(100, 11);
        all.add(new Event(new BigDecimal("999999999999999.999999999"), 1, "big", null));
        for (Aggregation a : Aggregation.values()) {
            for (WindowPartial p : List.of(new WindowPartial(a), of(a, all))) {
                DataOutputSerializer out = new DataOutputSerializer(64);
                WindowPartialSerializer.INSTANCE.serialize(p, out);
                WindowPartial back = WindowPartialSerializer.INSTANCE.deserialize(new DataInputDeserializer(out.getCopyOfBuffer()));
                assertEquals(p.value(), back.value(), a.name());
                assertEquals(p.eventCount(), back.eventCount(), a.name());
                // Merging after a restore keeps the restored state's extremes (LATEST's id, MAX).
                WindowPartial more = of(a, events(20, 3));
                back.merge(more);
                WindowPartial expected = WindowPartialSerializer.INSTANCE.copy(p);
                expected.merge(more);
                assertEquals(expected.value(), back.value(), a.name());
            }
        }
    }

    @Test
    void aNewerLayoutIsRefusedNamingIt() {
        DataInputDeserializer in = new DataInputDeserializer(new byte[] {2, 0, 0, 0, 0, 0, 0, 0, 0, 0});
        java.io.IOException e = assertThrows(java.io.IOException.class, () -> WindowPartialSerializer.INSTANCE.deserialize(in));
        assertEquals(true, e.getMessage().contains("layout version 2"));
    }
}
