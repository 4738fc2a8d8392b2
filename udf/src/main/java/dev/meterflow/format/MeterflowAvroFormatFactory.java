package dev.meterflow.format;

import java.util.Collections;
import java.util.Set;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.configuration.ReadableConfig;
import org.apache.flink.table.connector.format.DecodingFormat;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.factories.DeserializationFormatFactory;
import org.apache.flink.table.factories.DynamicTableFactory;
import org.apache.flink.table.factories.FactoryUtil;

/**
 * The {@code meterflow-avro} format: plain-Avro usage events (avro/usage_event.avsc) decoded
 * straight into internal rows, a malformed record into a row with its reason instead of a failure.
 *
 * <p>Use it as {@code 'format' = 'meterflow-avro'} (or {@code 'value.format'}) on a table whose
 * physical columns are the schema's fields ({@link UsageEventDecoder#ROW_TYPE}); declare the
 * format's metadata {@code value.error} (required) and {@code value.raw} as virtual columns.
 * Found through META-INF/services/org.apache.flink.table.factories.Factory.
 */
public final class MeterflowAvroFormatFactory implements DeserializationFormatFactory {

    public static final String IDENTIFIER = "meterflow-avro";

    @Override
    public DecodingFormat<DeserializationSchema<RowData>> createDecodingFormat(DynamicTableFactory.Context context, ReadableConfig formatOptions) {
        FactoryUtil.validateFactoryOptions(this, formatOptions);
        return new MeterflowAvroDecodingFormat();
    }

    @Override
    public String factoryIdentifier() {
        return IDENTIFIER;
    }

    @Override
    public Set<ConfigOption<?>> requiredOptions() {
        return Collections.emptySet();
    }

    @Override
    public Set<ConfigOption<?>> optionalOptions() {
        return Collections.emptySet();
    }
}
