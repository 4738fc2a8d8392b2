package dev.meterflow.operators;

import java.util.HashMap;
import java.util.Map;

import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * A dead letter's reason, bounded, counted in Flink metrics: {@code meterflow.dead_letter_records}
 * in total and {@code meterflow.dead_letter.<kind>} per kind (the reason's text before the first colon).
 *
 * <p>The reason is cut to {@link #MAX_REASON_CHARS} characters: a reason may quote what was sent
 * (an unknown meter, a bad field), and a dead letter must fit its topic whatever was sent. With the
 * payload and its limit, the reason also says when {@link BoundedPayload} cut the payload.
 */
public class CountDeadLetter extends ScalarFunction {
    private static final long serialVersionUID = 1L;

    /** Characters (code points) of a reason kept; meterflow/input_contract.py MAX_REASON_CHARS. */
    public static final int MAX_REASON_CHARS = 1000;

    static final int MAX_KIND_CHARS = 48;
    static final int MAX_KINDS = 64;
    static final String OTHER_KIND = "other";

    private transient MetricGroup group;
    private transient Counter total;
    private transient Map<String, Counter> byKind;

    @Override
    public void open(FunctionContext context) {
        group = context.getMetricGroup().addGroup("meterflow");
        total = group.counter("dead_letter_records");
        byKind = new HashMap<>();
    }

    public String eval(String reason) {
        String bounded = boundReason(reason, MAX_REASON_CHARS);
        if (group != null && bounded != null) {
            total.inc();
            byKind.computeIfAbsent(countedKind(byKind.keySet(), bounded), k -> group.addGroup("dead_letter").counter(k)).inc();
        }
        return bounded;
    }

    /**
     * The metric kind of a reason: its text before the first colon, as a metric name. Every reason
     * the job writes has a fixed text there; still, a metric per kind must never grow with the input,
     * so a kind is at most {@link #MAX_KIND_CHARS} characters, and a task counts at most {@link
     * #MAX_KINDS} kinds (new ones past that as {@code other}).
     */
    static String countedKind(java.util.Set<String> counted, String reason) {
        String kind = kindOf(reason);
        // A new kind past the cap is counted as "other": never one more metric per hostile input.
        return counted.contains(kind) || counted.size() < MAX_KINDS ? kind : OTHER_KIND;
    }

    static String kindOf(String reason) {
        String kind = reason.split(":", 2)[0].trim().replaceAll("[^A-Za-z0-9]+", "_").toLowerCase();
        return kind.length() > MAX_KIND_CHARS ? kind.substring(0, MAX_KIND_CHARS) : kind;
    }

    /** The bounded, counted reason, saying when the payload is longer than {@code maxPayloadBytes} and so cut. */
    public String eval(String reason, byte[] payload, int maxPayloadBytes) {
        String bounded = eval(reason);
        return bounded == null ? null : bounded + payloadNote(payload, maxPayloadBytes);
    }

    /**
     * {@code reason} if it has at most {@code maxChars} code points, else its first {@code maxChars}
     * code points (a surrogate pair is never split) and a mark saying so.
     */
    public static String boundReason(String reason, int maxChars) {
        // A String of at most maxChars UTF-16 units has at most maxChars code points: no count needed.
        if (reason == null || reason.length() <= maxChars || reason.codePointCount(0, reason.length()) <= maxChars) {
            return reason;
        }
        return reason.substring(0, reason.offsetByCodePoints(0, maxChars)) + "\u2026 (reason cut at " + maxChars + " characters)";
    }

    /** "; payload cut to N of M bytes" when {@code payload} is longer than {@code maxBytes}, else "". */
    public static String payloadNote(byte[] payload, int maxBytes) {
        return payload != null && payload.length > maxBytes ? "; payload cut to " + maxBytes + " of " + payload.length + " bytes" : "";
    }
}
