package dev.meterflow.source;

import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.table.connector.ChangelogMode;
import org.apache.flink.table.connector.source.DynamicTableSource;
import org.apache.flink.table.connector.source.ScanTableSource;
import org.apache.flink.table.connector.source.abilities.SupportsReadingMetadata;
import org.apache.flink.table.connector.source.abilities.SupportsWatermarkPushDown;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.types.DataType;

/**
 * Flink's Kafka table source with {@link CatchUpIdleness} around the watermarks the planner pushes
 * into it. Everything else (splits, offsets, metadata, state) is the Kafka source's own.
 */
final class MeterflowKafkaSource implements ScanTableSource, SupportsReadingMetadata, SupportsWatermarkPushDown {

    /** The Kafka source's metadata key of the record timestamp. */
    static final String APPEND_TIME_KEY = "timestamp";

    private final ScanTableSource kafka;
    private final long idleTimeoutMs;
    private final long catchUpTimeoutMs;
    private int appendTimeField = -1;

    MeterflowKafkaSource(ScanTableSource kafka, long idleTimeoutMs, long catchUpTimeoutMs) {
        if (!(kafka instanceof SupportsReadingMetadata) || !(kafka instanceof SupportsWatermarkPushDown)) {
            throw new IllegalArgumentException("the Kafka table source no longer reads metadata or takes watermarks: " + kafka.getClass().getName());
        }
        this.kafka = kafka;
        this.idleTimeoutMs = idleTimeoutMs;
        this.catchUpTimeoutMs = catchUpTimeoutMs;
    }

    @Override
    public Map<String, DataType> listReadableMetadata() {
        return ((SupportsReadingMetadata) kafka).listReadableMetadata();
    }

    @Override
    public void applyReadableMetadata(List<String> metadataKeys, DataType producedDataType) {
        ((SupportsReadingMetadata) kafka).applyReadableMetadata(metadataKeys, producedDataType);
        // Metadata columns follow the physical ones, in the order of the keys.
        int at = metadataKeys.indexOf(APPEND_TIME_KEY);
        appendTimeField = at < 0 ? -1 : producedDataType.getChildren().size() - metadataKeys.size() + at;
    }

    @Override
    public boolean supportsMetadataProjection() {
        return ((SupportsReadingMetadata) kafka).supportsMetadataProjection();
    }

    @Override
    public void applyWatermark(WatermarkStrategy<RowData> watermarkStrategy) {
        ((SupportsWatermarkPushDown) kafka).applyWatermark(new CatchUpIdleness(watermarkStrategy, appendTimeField, idleTimeoutMs, catchUpTimeoutMs));
    }

    @Override
    public ChangelogMode getChangelogMode() {
        return kafka.getChangelogMode();
    }

    @Override
    public ScanRuntimeProvider getScanRuntimeProvider(ScanContext context) {
        return kafka.getScanRuntimeProvider(context);
    }

    @Override
    public DynamicTableSource copy() {
        MeterflowKafkaSource copy = new MeterflowKafkaSource((ScanTableSource) kafka.copy(), idleTimeoutMs, catchUpTimeoutMs);
        copy.appendTimeField = appendTimeField;
        return copy;
    }

    @Override
    public String asSummaryString() {
        return "meterflow " + kafka.asSummaryString();
    }

    int appendTimeField() {
        return appendTimeField;
    }
}
