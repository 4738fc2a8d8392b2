package dev.meterflow.operators;

import java.util.Arrays;

import org.apache.flink.table.functions.ScalarFunction;

/**
 * A dead letter's payload: the message value as received, cut to {@code maxBytes} if it is longer.
 *
 * <p>The usage-events topic the project creates takes no longer value than the limit, so nothing is
 * cut there; a topic created elsewhere with a larger {@code max.message.bytes} could hold one, and
 * its dead letter must still fit the dead-letter topic. {@link CountDeadLetter} says so in the reason.
 */
public class BoundedPayload extends ScalarFunction {
    private static final long serialVersionUID = 1L;

    public byte[] eval(byte[] payload, int maxBytes) {
        return cut(payload, maxBytes);
    }

    /** {@code payload} itself if it has at most {@code maxBytes} bytes, else its first {@code maxBytes}. */
    public static byte[] cut(byte[] payload, int maxBytes) {
        return payload == null || payload.length <= maxBytes ? payload : Arrays.copyOf(payload, maxBytes);
    }
}
