package dev.meterflow.stages;

/** What the first stage hands the second: a window's key and its aggregate over some of its events. */
public final class PartialWindow {
    public final WindowKey key;
    public final WindowPartial partial;

    public PartialWindow(WindowKey key, WindowPartial partial) {
        this.key = key;
        this.partial = partial;
    }

    @Override
    public String toString() {
        return key + "=" + partial.value() + "/" + partial.eventCount();
    }
}
