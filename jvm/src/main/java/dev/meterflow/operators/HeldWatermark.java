package dev.meterflow.operators;

import java.util.Collections;

import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.state.OperatorStateStore;
import org.apache.flink.api.common.typeinfo.Types;

/**
 * The watermark an operator decides lateness against, kept across restores: the highest watermark
 * seen and the closed-through boundary ({@link WindowClose#closedThrough}), each in union list
 * state, so a restore, at any parallelism, starts every subtask from the highest of them. Shared by
 * the classifier of the SQL job ({@link LatenessClassifier}, whose docstring says why) and the
 * first keyed stage ({@code dev.meterflow.stages.DedupAndPartials}).
 */
public final class HeldWatermark {
    private final long allowedLatenessMs;
    private ListState<Long> heldState;
    private ListState<Long> closedThroughState;
    private long held = WindowClose.NO_WATERMARK;
    private long closedThrough = WindowClose.NOTHING_CLOSED;
    private long forwarded = WindowClose.NO_WATERMARK;

    public HeldWatermark(long allowedLatenessMs) {
        this.allowedLatenessMs = allowedLatenessMs;
    }

    /** Registers the state and takes the highest held watermark and boundary restored (none: nothing held). */
    public void initialize(OperatorStateStore store) throws Exception {
        heldState = store.getUnionListState(new ListStateDescriptor<>("held-watermark", Types.LONG));
        held = WindowClose.NO_WATERMARK;
        for (Long restored : heldState.get()) {
            held = Math.max(held, restored);
        }
        // Savepoints taken before the boundary existed restore an empty list (nothing closed).
        closedThroughState = store.getUnionListState(new ListStateDescriptor<>("closed-through", Types.LONG));
        closedThrough = WindowClose.NOTHING_CLOSED;
        for (Long restored : closedThroughState.get()) {
            closedThrough = Math.max(closedThrough, restored);
        }
        closedThrough = WindowClose.closedThrough(closedThrough, held, allowedLatenessMs);
        forwarded = WindowClose.NO_WATERMARK;
    }

    /**
     * Holds at least {@code watermarkMs} and the closed-through boundary {@code closedThroughMs} from now
     * on: what the other graph held, when this one takes the counting over from it.
     */
    public void holdAtLeast(long watermarkMs, long closedThroughMs) {
        held = Math.max(held, watermarkMs);
        closedThrough = WindowClose.closedThrough(Math.max(closedThrough, closedThroughMs), held, allowedLatenessMs);
    }

    public void snapshot() throws Exception {
        heldState.update(Collections.singletonList(held));
        closedThroughState.update(Collections.singletonList(closedThrough));
    }

    /** Takes a watermark in; true when the held one rose past what was forwarded (forward {@link #held()} then). */
    public boolean advance(long watermarkMs) {
        held = Math.max(held, watermarkMs);
        closedThrough = WindowClose.closedThrough(closedThrough, held, allowedLatenessMs);
        if (held > forwarded) {
            forwarded = held;
            return true;
        }
        return false;
    }

    /** Whether an event of the window ending at {@code windowEndMs} is late now. */
    public boolean isLate(long windowEndMs) {
        return WindowClose.isLate(windowEndMs, allowedLatenessMs, held, closedThrough);
    }

    /** The watermark decisions use (epoch ms; {@link WindowClose#NO_WATERMARK} before any). */
    public long held() {
        return held;
    }

    /** The highest window end judged closed so far (epoch ms), {@link WindowClose#NOTHING_CLOSED} before any. */
    public long closedThrough() {
        return closedThrough;
    }
}
