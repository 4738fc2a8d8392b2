package dev.meterflow.stages;

import java.io.IOException;
import java.io.Serializable;
import java.math.BigDecimal;
import java.math.RoundingMode;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;

import org.apache.flink.api.common.typeinfo.TypeInfo;
import org.apache.flink.core.memory.DataInputView;
import org.apache.flink.core.memory.DataOutputView;

/**
 * One window's aggregate over some of its events, exact and mergeable: the first stage sums events
 * into partials in memory, the second merges partials into the window's state. Merging partials in
 * any grouping gives the value aggregating every event at once gives, for each aggregation the job
 * offers (meterflow/config.py {@code Aggregation}):
 *
 * <ul>
 *   <li>SUM: quantities at the job's scale ({@link #SCALE}) as an unscaled long, moving to a
 *       BigDecimal on the first overflow, so the common case allocates nothing;
 *   <li>COUNT: the event count;
 *   <li>MAX: the greatest quantity;
 *   <li>LATEST: the quantity of the event with the greatest event time, ties broken by the greatest
 *       event id compared as UTF-8 bytes (as the SQL job's {@code MAX} over strings compares them);
 *   <li>UNIQUE_COUNT: the distinct values of one dimension (a missing value is not counted).
 * </ul>
 *
 * <p>The event count is kept for every aggregation: it is the window row's {@code event_count}, and
 * its {@code revision} (every update of a window adds at least one event).
 */
@TypeInfo(WindowPartialTypeInfo.Factory.class)
public final class WindowPartial implements Serializable {
    private static final long serialVersionUID = 1L;

    /** The job's quantity scale: DECIMAL(38, 9). */
    public static final int SCALE = 9;

    /** Digits of the job's quantity type: a value past it can't be stored and is refused at the input. */
    public static final int PRECISION = 38;

    public enum Aggregation { SUM, COUNT, MAX, LATEST, UNIQUE_COUNT }

    private final Aggregation aggregation;
    private long eventCount;
    private long sumUnscaled;
    private BigDecimal sumBig; // non-null once the unscaled long overflowed
    private BigDecimal max;
    private long latestTimeMs;
    private byte[] latestId;
    private BigDecimal latestQuantity;
    private Set<String> uniques;

    public WindowPartial(Aggregation aggregation) {
        this.aggregation = aggregation;
        if (aggregation == Aggregation.UNIQUE_COUNT) {
            uniques = new HashSet<>();
        }
    }

    public Aggregation aggregation() {
        return aggregation;
    }

    public long eventCount() {
        return eventCount;
    }

    /**
     * Adds one event. {@code quantity} is at most {@link #SCALE} decimal places (the input contract);
     * {@code uniqueValue} is the event's value of the meter's unique dimension, or null. True when
     * that value is new here: the partial holds one more distinct value.
     */
    public boolean add(BigDecimal quantity, long eventTimeMs, String eventId, String uniqueValue) {
        eventCount++;
        switch (aggregation) {
            case SUM -> addToSum(quantity);
            case MAX -> max = max == null || quantity.compareTo(max) > 0 ? quantity : max;
            case LATEST -> takeIfLater(eventTimeMs, eventId.getBytes(StandardCharsets.UTF_8), quantity);
            case UNIQUE_COUNT -> {
                return uniqueValue != null && uniques.add(uniqueValue);
            }
            case COUNT -> { }
        }
        return false;
    }

    /** The distinct values held (0 but for UNIQUE_COUNT). */
    public int uniqueValues() {
        return uniques == null ? 0 : uniques.size();
    }

    /** Adds every event {@code other} holds (same aggregation). */
    public void merge(WindowPartial other) {
        if (other.aggregation != aggregation) {
            throw new IllegalArgumentException("partials of " + aggregation + " and " + other.aggregation + " do not merge");
        }
        eventCount += other.eventCount;
        switch (aggregation) {
            case SUM -> {
                if (other.sumBig != null) {
                    sumBig = currentSum().add(other.sumBig);
                } else {
                    addUnscaled(other.sumUnscaled);
                }
            }
            case MAX -> {
                if (other.max != null && (max == null || other.max.compareTo(max) > 0)) {
                    max = other.max;
                }
            }
            case LATEST -> {
                if (other.latestId != null) {
                    takeIfLater(other.latestTimeMs, other.latestId, other.latestQuantity);
                }
            }
            case UNIQUE_COUNT -> uniques.addAll(other.uniques);
            case COUNT -> { }
        }
    }

    /** The window's value over the events added: exact, at scale {@link #SCALE}. */
    public BigDecimal value() {
        BigDecimal v = switch (aggregation) {
            case SUM -> currentSum();
            case COUNT -> BigDecimal.valueOf(eventCount);
            case MAX -> max == null ? BigDecimal.ZERO : max;
            case LATEST -> latestQuantity == null ? BigDecimal.ZERO : latestQuantity;
            case UNIQUE_COUNT -> BigDecimal.valueOf(uniques.size());
        };
        // Every input has at most SCALE places, so this never rounds.
        return v.setScale(SCALE, RoundingMode.UNNECESSARY);
    }

    private void addToSum(BigDecimal quantity) {
        BigDecimal scaled = quantity.setScale(SCALE, RoundingMode.UNNECESSARY);
        if (sumBig == null && scaled.unscaledValue().bitLength() < 64) {
            addUnscaled(scaled.unscaledValue().longValue());
        } else {
            sumBig = currentSum().add(scaled);
        }
    }

    private void addUnscaled(long unscaled) {
        if (sumBig == null) {
            long sum = sumUnscaled + unscaled;
            // Overflow iff both operands have the same sign and the sum's sign differs.
            if (((sumUnscaled ^ sum) & (unscaled ^ sum)) >= 0) {
                sumUnscaled = sum;
                return;
            }
            sumBig = BigDecimal.valueOf(sumUnscaled, SCALE);
        }
        sumBig = sumBig.add(BigDecimal.valueOf(unscaled, SCALE));
    }

    private BigDecimal currentSum() {
        return sumBig != null ? sumBig : BigDecimal.valueOf(sumUnscaled, SCALE);
    }

    private void takeIfLater(long timeMs, byte[] id, BigDecimal quantity) {
        if (latestId == null || timeMs > latestTimeMs || (timeMs == latestTimeMs && Arrays.compareUnsigned(id, latestId) > 0)) {
            latestTimeMs = timeMs;
            latestId = id;
            latestQuantity = quantity;
        }
    }

    /** Writes the partial in the layout {@link WindowPartialSerializer} documents. */
    void writeTo(DataOutputView out) throws IOException {
        out.writeByte(WindowPartialSerializer.VERSION);
        out.writeUTF(aggregation.name()); // by name: the enum's order may change
        out.writeLong(eventCount);
        switch (aggregation) {
            case SUM -> {
                out.writeBoolean(sumBig != null);
                if (sumBig != null) {
                    WindowPartialSerializer.writeDecimal(sumBig, out);
                } else {
                    out.writeLong(sumUnscaled);
                }
            }
            case MAX -> {
                out.writeBoolean(max != null);
                if (max != null) {
                    WindowPartialSerializer.writeDecimal(max, out);
                }
            }
            case LATEST -> {
                out.writeBoolean(latestId != null);
                if (latestId != null) {
                    out.writeLong(latestTimeMs);
                    out.writeInt(latestId.length);
                    out.write(latestId);
                    WindowPartialSerializer.writeDecimal(latestQuantity, out);
                }
            }
            case UNIQUE_COUNT -> {
                out.writeInt(uniques.size());
                for (String u : uniques) {
                    out.writeUTF(u);
                }
            }
            case COUNT -> { }
        }
    }

    /** Reads a partial written by {@link #writeTo} (any layout version so far). */
    static WindowPartial readFrom(DataInputView in) throws IOException {
        int version = in.readByte();
        if (version < 1 || version > WindowPartialSerializer.VERSION) {
            throw new IOException("a window partial of layout version " + version + "; this release reads 1 to " + WindowPartialSerializer.VERSION);
        }
        WindowPartial p = new WindowPartial(Aggregation.valueOf(in.readUTF()));
        p.eventCount = in.readLong();
        switch (p.aggregation) {
            case SUM -> {
                if (in.readBoolean()) {
                    p.sumBig = WindowPartialSerializer.readDecimal(in);
                } else {
                    p.sumUnscaled = in.readLong();
                }
            }
            case MAX -> p.max = in.readBoolean() ? WindowPartialSerializer.readDecimal(in) : null;
            case LATEST -> {
                if (in.readBoolean()) {
                    p.latestTimeMs = in.readLong();
                    p.latestId = new byte[in.readInt()];
                    in.readFully(p.latestId);
                    p.latestQuantity = WindowPartialSerializer.readDecimal(in);
                }
            }
            case UNIQUE_COUNT -> {
                int n = in.readInt();
                for (int i = 0; i < n; i++) {
                    p.uniques.add(in.readUTF());
                }
            }
            case COUNT -> { }
        }
        return p;
    }
}
