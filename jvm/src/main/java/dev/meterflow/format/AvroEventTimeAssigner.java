package dev.meterflow.format;

import org.apache.flink.api.common.eventtime.SerializableTimestampAssigner;
import org.apache.flink.table.data.GenericRowData;

/**
 * The event time of a raw Avro usage event, for a watermark strategy on a Kafka source of bytes.
 *
 * <p>A DataStream job that decodes in Python cannot assign timestamps inside the source, so its
 * watermarks would be per subtask instead of per partition. This assigner runs in the source, on
 * the raw bytes, with the same decoder as the meterflow-avro format. A record it cannot decode
 * keeps its Kafka record timestamp (the job's own decode then decides what to do with it).
 */
public final class AvroEventTimeAssigner implements SerializableTimestampAssigner<byte[]> {

    private static final long serialVersionUID = 1L;
    private static final int EVENT_TIME = java.util.Arrays.asList(UsageEventDecoder.FIELDS).indexOf("event_time");

    private transient UsageEventDecoder decoder;
    private transient GenericRowData row;

    @Override
    public long extractTimestamp(byte[] message, long recordTimestamp) {
        if (decoder == null) {
            decoder = new UsageEventDecoder();
            row = new GenericRowData(UsageEventDecoder.ARITY);
        }
        if (decoder.decodeInto(message, row) != null) {
            return recordTimestamp;
        }
        return row.getTimestamp(EVENT_TIME, 3).getMillisecond();
    }
}
