package dev.meterflow.source;

import java.time.Duration;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.configuration.ConfigOptions;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.catalog.ResolvedCatalogTable;
import org.apache.flink.table.connector.source.DynamicTableSource;
import org.apache.flink.table.connector.source.ScanTableSource;
import org.apache.flink.table.factories.DynamicTableSourceFactory;
import org.apache.flink.table.factories.FactoryUtil;

/**
 * The {@code meterflow-kafka} connector: Flink's {@code kafka} connector, every option of it, with
 * {@link CatchUpIdleness} in place of {@code table.exec.source.idle-timeout} (leave that at 0).
 * Found through META-INF/services/org.apache.flink.table.factories.Factory.
 */
public final class MeterflowKafkaTableFactory implements DynamicTableSourceFactory {

    public static final String IDENTIFIER = "meterflow-kafka";

    public static final ConfigOption<Duration> IDLE_TIMEOUT = ConfigOptions.key("meterflow.idle-timeout")
            .durationType()
            .defaultValue(Duration.ZERO)
            .withDescription("Silence after which a partition read up to its head stops holding the watermark; 0 turns idleness off.");

    public static final ConfigOption<Duration> CATCH_UP_TIMEOUT = ConfigOptions.key("meterflow.catch-up-timeout")
            .durationType()
            .defaultValue(Duration.ZERO)
            .withDescription("Silence after which any partition, also one still reading its backlog, stops holding the watermark.");

    @Override
    public String factoryIdentifier() {
        return IDENTIFIER;
    }

    @Override
    public Set<ConfigOption<?>> requiredOptions() {
        return Set.of();
    }

    @Override
    public Set<ConfigOption<?>> optionalOptions() {
        return new HashSet<>(Set.of(IDLE_TIMEOUT, CATCH_UP_TIMEOUT));
    }

    @Override
    public DynamicTableSource createDynamicTableSource(Context context) {
        ResolvedCatalogTable table = context.getCatalogTable();
        Map<String, String> kafkaOptions = new HashMap<>(table.getOptions());
        Configuration ours = new Configuration();
        for (ConfigOption<Duration> option : Set.of(IDLE_TIMEOUT, CATCH_UP_TIMEOUT)) {
            String value = kafkaOptions.remove(option.key());
            if (value != null) {
                ours.setString(option.key(), value);
            }
        }
        long idleMs = ours.get(IDLE_TIMEOUT).toMillis();
        long catchUpMs = Math.max(ours.get(CATCH_UP_TIMEOUT).toMillis(), idleMs);
        kafkaOptions.put(FactoryUtil.CONNECTOR.key(), "kafka");
        DynamicTableSource kafka = FactoryUtil.createDynamicTableSource(
                null, context.getObjectIdentifier(), table.copy(kafkaOptions), context.getEnrichmentOptions(),
                context.getConfiguration(), context.getClassLoader(), context.isTemporary());
        if (!(kafka instanceof ScanTableSource)) {
            throw new ValidationException("the kafka connector gave no scan source: " + kafka.getClass().getName());
        }
        return new MeterflowKafkaSource((ScanTableSource) kafka, idleMs, catchUpMs);
    }
}
