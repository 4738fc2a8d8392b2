package dev.meterflow.stages;

import java.util.Map;

import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.streaming.api.functions.ProcessFunction;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * The window guard's output, split in its task: each counted event as a {@link MeteredEvent} for the
 * first stage, each record with a {@code reject_reason} (rejected by the validation or refused by
 * the guard) unchanged to {@link #rejected}, for the dead-letter sink. Rows without a {@code
 * reject_reason} column are all counted. Per record in Java, so the events never pass through a
 * table conversion on their way to the stages.
 */
public final class CountedOrRejected extends ProcessFunction<RowData, MeteredEvent> {
    private static final long serialVersionUID = 1L;

    private final MapFunction<RowData, MeteredEvent> events;
    private final int rejectField;
    private final OutputTag<RowData> rejected;

    /**
     * @param type the input rows' type (holding {@link StageRows#EVENT_COLUMNS}, and {@code reject_reason} if any is rejected)
     * @param uniqueDimensions each UNIQUE_COUNT meter's dimension
     */
    public CountedOrRejected(RowType type, Map<String, String> uniqueDimensions) {
        this.events = StageRows.events(type, uniqueDimensions);
        this.rejectField = type.getFieldIndex("reject_reason");
        this.rejected = rejectedTag(type);
    }

    /** The side output of the rejected records, rows of the input's type. */
    public static OutputTag<RowData> rejectedTag(RowType type) {
        return new OutputTag<>("rejected-records", InternalTypeInfo.of(type));
    }

    @Override
    public void processElement(RowData row, Context ctx, Collector<MeteredEvent> out) throws Exception {
        if (rejectField >= 0 && !row.isNullAt(rejectField)) {
            ctx.output(rejected, row);
        } else {
            out.collect(events.map(row));
        }
    }
}
