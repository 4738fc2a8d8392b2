package dev.meterflow.stages;

/** An event the first stage judged late, with the window it missed and the watermark it was judged against (for the late-events topic). */
public final class LateEvent {
    public MeteredEvent event;
    public long windowStartMs;
    public long windowEndMs;
    /** The held watermark of the decision (epoch ms). */
    public long watermarkMs;

    public LateEvent() {}

    public LateEvent(MeteredEvent event, long windowStartMs, long windowEndMs, long watermarkMs) {
        this.event = event;
        this.windowStartMs = windowStartMs;
        this.windowEndMs = windowEndMs;
        this.watermarkMs = watermarkMs;
    }

    @Override
    public String toString() {
        return event + " late at " + watermarkMs;
    }
}
