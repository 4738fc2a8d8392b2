package dev.meterflow.source;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertSame;

import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.table.api.DataTypes;
import org.apache.flink.table.connector.ChangelogMode;
import org.apache.flink.table.connector.source.DynamicTableSource;
import org.apache.flink.table.connector.source.ScanTableSource;
import org.apache.flink.table.connector.source.abilities.SupportsReadingMetadata;
import org.apache.flink.table.connector.source.abilities.SupportsWatermarkPushDown;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.types.DataType;
import org.junit.jupiter.api.Test;

/** The decorator finds the append time among the metadata columns and hands the Kafka source its watermarks with catch-up idleness. */
class MeterflowKafkaSourceTest {

    /** Stands in for Flink's Kafka table source: records what the planner handed it. */
    private static final class KafkaLike implements ScanTableSource, SupportsReadingMetadata, SupportsWatermarkPushDown {
        WatermarkStrategy<RowData> watermarks;
        List<String> metadata;

        @Override
        public Map<String, DataType> listReadableMetadata() {
            return Map.of("timestamp", DataTypes.TIMESTAMP_LTZ(3));
        }

        @Override
        public void applyReadableMetadata(List<String> metadataKeys, DataType producedDataType) {
            metadata = metadataKeys;
        }

        @Override
        public void applyWatermark(WatermarkStrategy<RowData> watermarkStrategy) {
            watermarks = watermarkStrategy;
        }

        @Override
        public ChangelogMode getChangelogMode() {
            return ChangelogMode.insertOnly();
        }

        @Override
        public ScanRuntimeProvider getScanRuntimeProvider(ScanContext context) {
            return null;
        }

        @Override
        public DynamicTableSource copy() {
            return new KafkaLike();
        }

        @Override
        public String asSummaryString() {
            return "kafka";
        }
    }

    private static DataType produced(int physical, List<String> metadata) {
        DataTypes.Field[] fields = new DataTypes.Field[physical + metadata.size()];
        for (int i = 0; i < fields.length; i++) {
            fields[i] = DataTypes.FIELD("f" + i, DataTypes.STRING());
        }
        return DataTypes.ROW(fields);
    }

    @Test
    void theAppendTimeIsTheTimestampMetadataColumnAfterThePhysicalOnes() {
        KafkaLike kafka = new KafkaLike();
        MeterflowKafkaSource source = new MeterflowKafkaSource(kafka, 10_000, 60_000);
        List<String> metadata = List.of("value.error", "value.raw", "topic", "partition", "offset", "timestamp");
        source.applyReadableMetadata(metadata, produced(9, metadata));
        assertEquals(9 + 5, source.appendTimeField());
        assertSame(metadata, kafka.metadata);
        assertEquals(9 + 5, ((MeterflowKafkaSource) source.copy()).appendTimeField());
    }

    @Test
    void withoutTheTimestampMetadataThereIsNoAppendTime() {
        MeterflowKafkaSource source = new MeterflowKafkaSource(new KafkaLike(), 10_000, 60_000);
        List<String> metadata = List.of("partition");
        source.applyReadableMetadata(metadata, produced(3, metadata));
        assertEquals(-1, source.appendTimeField());
    }

    @Test
    void thePushedWatermarksReachKafkaWithCatchUpIdleness() {
        KafkaLike kafka = new KafkaLike();
        new MeterflowKafkaSource(kafka, 10_000, 60_000).applyWatermark(WatermarkStrategy.noWatermarks());
        assertInstanceOf(CatchUpIdleness.class, kafka.watermarks);
    }
}
