package dev.meterflow.stages;

import java.util.Objects;

import org.apache.flink.api.java.functions.KeySelector;

/** A window row's key and span: (tenant, customer, meter, dimensions key, [start, end)). */
public final class WindowKey {
    public String tenantId;
    public String customerId;
    public String meter;
    public String dimensionsKey;
    public long windowStartMs;
    public long windowEndMs;

    public WindowKey() {}

    public WindowKey(String tenantId, String customerId, String meter, String dimensionsKey, long windowStartMs, long windowEndMs) {
        this.tenantId = tenantId;
        this.customerId = customerId;
        this.meter = meter;
        this.dimensionsKey = dimensionsKey;
        this.windowStartMs = windowStartMs;
        this.windowEndMs = windowEndMs;
    }

    /** The tumbling window of {@code windowSizeMs} (aligned to the epoch, as Flink's TUMBLE in UTC) holding the event. */
    public static WindowKey of(MeteredEvent e, long windowSizeMs) {
        long start = Math.floorDiv(e.eventTimeMs, windowSizeMs) * windowSizeMs;
        return new WindowKey(e.tenantId, e.customerId, e.meter, e.dimensionsKey, start, start + windowSizeMs);
    }

    /** The second stage's key: the window key as one string (unit-separated; the input contract keeps U+001F out of ids). */
    public static KeySelector<PartialWindow, String> selector() {
        return p -> p.key.asString();
    }

    public String asString() {
        return tenantId + '\u001f' + customerId + '\u001f' + meter + '\u001f' + dimensionsKey + '\u001f' + windowStartMs;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof WindowKey k && windowStartMs == k.windowStartMs && windowEndMs == k.windowEndMs && tenantId.equals(k.tenantId)
            && customerId.equals(k.customerId) && meter.equals(k.meter) && dimensionsKey.equals(k.dimensionsKey);
    }

    @Override
    public int hashCode() {
        return Objects.hash(tenantId, customerId, meter, dimensionsKey, windowStartMs);
    }

    @Override
    public String toString() {
        return asString().replace('\u001f', '/') + "+" + (windowEndMs - windowStartMs);
    }
}
