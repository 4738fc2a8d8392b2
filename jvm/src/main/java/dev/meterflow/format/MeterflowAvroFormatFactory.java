package dev.meterflow.format;

import java.net.URI;
import java.util.Collections;
import java.util.Set;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.configuration.ConfigOptions;
import org.apache.flink.configuration.ReadableConfig;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.connector.format.DecodingFormat;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.factories.DeserializationFormatFactory;
import org.apache.flink.table.factories.DynamicTableFactory;
import org.apache.flink.table.factories.FactoryUtil;

/**
 * The {@code meterflow-avro} format: usage events (avro/usage_event.avsc) decoded straight into
 * internal rows, a malformed record into a row with its reason instead of a failure. Values may be
 * plain Avro, Avro single-object encoded with a writer schema of avro/history, or in a schema
 * registry's wire format when {@link #SCHEMA_REGISTRY_URL} is set ({@link FramedValueDecoder}).
 *
 * <p>Use it as {@code 'format' = 'meterflow-avro'} (or {@code 'value.format'}) on a table whose
 * physical columns are the schema's fields ({@link UsageEventDecoder#ROW_TYPE}); declare the
 * format's metadata as virtual columns: {@code value.error} or {@code value.reject} (at least one),
 * {@code value.raw}, and, with {@link #METERS} set, {@code value.reject} and {@code value.dimensions-key}.
 * Found through META-INF/services/org.apache.flink.table.factories.Factory.
 */
public final class MeterflowAvroFormatFactory implements DeserializationFormatFactory {

    public static final String IDENTIFIER = "meterflow-avro";

    /** In a table's options {@code 'meterflow-avro.schema-registry.url'} (with {@code 'format'}; {@code 'value.meterflow-avro.…'} with {@code 'value.format'}). */
    public static final ConfigOption<String> SCHEMA_REGISTRY_URL = ConfigOptions.key("schema-registry.url")
            .stringType()
            .noDefaultValue()
            .withDescription("Base URL of a Confluent-compatible schema registry: values in its wire format (0x00, 4-byte schema id) are"
                    + " decoded with the writer schema GET {url}/schemas/ids/{id} returns. Without it such values are dead letters.");

    /** In a table's options {@code 'meterflow-avro.meters'}: the configured meters, for the {@code reject} and {@code dimensions-key} metadata ({@link EventRules#parse}). */
    public static final ConfigOption<String> METERS = ConfigOptions.key("meters")
            .stringType()
            .noDefaultValue()
            .withDescription("The configured meters as a JSON object of name to {\"allow_negative\": bool, \"group_by\": [dimension, ...]}:"
                    + " the rules behind the 'reject' and 'dimensions-key' metadata.");

    @Override
    public DecodingFormat<DeserializationSchema<RowData>> createDecodingFormat(DynamicTableFactory.Context context, ReadableConfig formatOptions) {
        FactoryUtil.validateFactoryOptions(this, formatOptions);
        String url = formatOptions.getOptional(SCHEMA_REGISTRY_URL).map(String::strip).filter(u -> !u.isEmpty()).orElse(null);
        if (url != null) {
            checkUrl(url);
        }
        EventRules rules = formatOptions.getOptional(METERS).map(EventRules::parse).orElse(null);
        return new MeterflowAvroDecodingFormat(url, rules);
    }

    /** An http(s) URL with a host, checked at planning rather than at the first registry-framed message. */
    static void checkUrl(String url) {
        URI uri;
        try {
            uri = URI.create(url);
        } catch (IllegalArgumentException e) {
            throw new ValidationException("'" + SCHEMA_REGISTRY_URL.key() + "' is not a URL: " + url, e);
        }
        if (!("http".equalsIgnoreCase(uri.getScheme()) || "https".equalsIgnoreCase(uri.getScheme())) || uri.getHost() == null) {
            throw new ValidationException("'" + SCHEMA_REGISTRY_URL.key() + "' must be an http(s) URL with a host, got " + url);
        }
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
        return Set.of(SCHEMA_REGISTRY_URL, METERS);
    }
}
