package dev.meterflow.udf;

import java.util.HashMap;
import java.util.Map;

import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * Identity on a dead-letter reason that counts it in Flink metrics: {@code meterflow.dead_letter_records}
 * in total and {@code meterflow.dead_letter.<kind>} per kind (the reason's text before the first colon).
 */
public class CountDeadLetter extends ScalarFunction {

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
        if (group != null && reason != null) {
            total.inc();
            String kind = reason.split(":", 2)[0].trim().replaceAll("[^A-Za-z0-9]+", "_").toLowerCase();
            byKind.computeIfAbsent(kind, k -> group.addGroup("dead_letter").counter(k)).inc();
        }
        return reason;
    }
}
