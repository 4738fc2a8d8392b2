package dev.meterflow.stages;

import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;

import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.shaded.guava33.com.google.common.hash.HashFunction;
import org.apache.flink.shaded.guava33.com.google.common.hash.Hashing;

/**
 * A validated usage event as the first stage reads it: the fields its window and aggregate need,
 * and a compact 128-bit key of (tenant_id, event_id) for the dedup.
 *
 * <p>The key is murmur3-128 of the tenant's length, the tenant and the event id (length-prefixed,
 * so ("ab", "c") and ("a", "bc") never share an input). Two different ids of one deployment share
 * a key with probability about n² / 2¹²⁹ for n ids within the dedup horizon: for 10¹² ids about
 * 1.5·10⁻¹⁵. A shared key makes the later event count as a duplicate of the earlier one.
 */
public class MeteredEvent {
    private static final HashFunction MURMUR = Hashing.murmur3_128();

    public String tenantId;
    public String customerId;
    public String meter;
    public String dimensionsKey;
    public String eventId;
    public long eventTimeMs;
    public BigDecimal quantity;
    /** The value of the meter's unique dimension (UNIQUE_COUNT meters), or null. */
    public String uniqueValue;
    /**
     * The event's dimensions as sent, names and values at the same positions (null: none), for the
     * late-events topic only. Arrays, not a map: Flink's POJO serializer takes them without Kryo.
     */
    public String[] dimensionNames;
    public String[] dimensionValues;
    /**
     * Read again at a handover: the graph counting before it read this record already (it counted it,
     * routed it late or refused it), so it marks its id and is counted only in a window that graph
     * left open ({@code meterflow.handover}).
     */
    public boolean replayed;
    public long idHashHigh;
    public long idHashLow;

    /** For Flink's POJO serializer, which carries the id key's fields too; build events with the other constructor. */
    public MeteredEvent() {}

    public MeteredEvent(String tenantId, String customerId, String meter, String dimensionsKey, String eventId, long eventTimeMs, BigDecimal quantity, String uniqueValue) {
        this.tenantId = tenantId;
        this.customerId = customerId;
        this.meter = meter;
        this.dimensionsKey = dimensionsKey;
        this.eventId = eventId;
        this.eventTimeMs = eventTimeMs;
        this.quantity = quantity;
        this.uniqueValue = uniqueValue;
        byte[] tenant = tenantId.getBytes(StandardCharsets.UTF_8);
        byte[] hash = MURMUR.newHasher().putInt(tenant.length).putBytes(tenant).putBytes(eventId.getBytes(StandardCharsets.UTF_8)).hash().asBytes();
        java.nio.ByteBuffer b = java.nio.ByteBuffer.wrap(hash);
        this.idHashHigh = b.getLong();
        this.idHashLow = b.getLong();
    }

    /** The first stage's key: the 128-bit hash of (tenant_id, event_id). */
    public static KeySelector<MeteredEvent, Tuple2<Long, Long>> idKey() {
        return e -> Tuple2.of(e.idHashHigh, e.idHashLow);
    }

    @Override
    public String toString() {
        return tenantId + "/" + eventId + "@" + eventTimeMs;
    }
}
