package dev.meterflow.stages;

/**
 * What the first stage hands the second: a window's key and its aggregate over some of its events.
 * A POJO of a POJO and a {@link WindowPartialTypeInfo}: no field goes through Kryo.
 */
public final class PartialWindow {
    public WindowKey key;
    public WindowPartial partial;

    public PartialWindow() {}

    public PartialWindow(WindowKey key, WindowPartial partial) {
        this.key = key;
        this.partial = partial;
    }

    @Override
    public String toString() {
        return key + "=" + partial.value() + "/" + partial.eventCount();
    }
}
