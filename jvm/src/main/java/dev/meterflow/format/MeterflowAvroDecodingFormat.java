package dev.meterflow.format;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.table.api.DataTypes;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.connector.ChangelogMode;
import org.apache.flink.table.connector.format.DecodingFormat;
import org.apache.flink.table.connector.source.DynamicTableSource;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.types.DataType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.utils.LogicalTypeParser;
import org.apache.flink.table.types.utils.DataTypeUtils;

/**
 * Plans the {@code meterflow-avro} decoder: checks the table's physical columns against the usage
 * event row and appends the requested format metadata ({@code error}, {@code raw}, {@code reject},
 * {@code dimensions-key}) to the produced row.
 */
public final class MeterflowAvroDecodingFormat implements DecodingFormat<DeserializationSchema<RowData>> {

    /** Why the record is not a usage event, or null. */
    public static final String ERROR = "error";
    /** The message bytes exactly as received (empty for a null value). */
    public static final String RAW = "raw";
    /** Why the record cannot be counted, as far as the message alone tells: {@code error}, else the meters' rules ({@link EventRules#reject}); or null. */
    public static final String REJECT = "reject";
    /** The group-by key of the record's meter ({@link EventRules#dimensionsKey}); {@code {}} when it is not an event of a configured meter. */
    public static final String DIMENSIONS_KEY = "dimensions-key";

    /** The schema registry's base URL, or null. */
    private final String registryUrl;
    /** The {@code meters} option's rules, or null. */
    private final EventRules rules;
    private List<String> metadataKeys = List.of();

    /** A format for plain and single-object values only: registry-framed ones become dead letters. */
    public MeterflowAvroDecodingFormat() {
        this(null, null);
    }

    /**
     * @param registryUrl the {@code schema-registry.url} option: decode registry-framed values with the writer schema it holds; null for none
     * @param rules the {@code meters} option's rules, needed for the {@code reject} and {@code dimensions-key} metadata; null for none
     */
    public MeterflowAvroDecodingFormat(String registryUrl, EventRules rules) {
        this.registryUrl = registryUrl;
        this.rules = rules;
    }

    @Override
    public Map<String, DataType> listReadableMetadata() {
        Map<String, DataType> metadata = new LinkedHashMap<>();
        metadata.put(ERROR, DataTypes.STRING());
        metadata.put(RAW, DataTypes.BYTES());
        metadata.put(REJECT, DataTypes.STRING());
        metadata.put(DIMENSIONS_KEY, DataTypes.STRING().notNull());
        return metadata;
    }

    @Override
    public void applyReadableMetadata(List<String> metadataKeys) {
        this.metadataKeys = List.copyOf(metadataKeys);
    }

    @Override
    public DeserializationSchema<RowData> createRuntimeDecoder(DynamicTableSource.Context context, DataType physicalDataType) {
        checkPhysicalType(physicalDataType.getLogicalType());
        if (!metadataKeys.contains(ERROR) && !metadataKeys.contains(REJECT)) {
            // Without it a malformed record would turn into a row of nulls, indistinguishable from data.
            throw new ValidationException(
                    "format '" + MeterflowAvroFormatFactory.IDENTIFIER + "' needs the '" + ERROR + "' or the '" + REJECT
                            + "' metadata column (e.g. `format_reject` STRING METADATA FROM 'value." + REJECT + "' VIRTUAL)");
        }
        if (rules == null && (metadataKeys.contains(REJECT) || metadataKeys.contains(DIMENSIONS_KEY))) {
            throw new ValidationException("format '" + MeterflowAvroFormatFactory.IDENTIFIER + "': the '" + REJECT + "' and '" + DIMENSIONS_KEY
                    + "' metadata need the '" + MeterflowAvroFormatFactory.METERS.key() + "' option");
        }
        Map<String, DataType> readable = listReadableMetadata();
        List<DataTypes.Field> fields = new ArrayList<>();
        for (String key : metadataKeys) {
            fields.add(DataTypes.FIELD(key, readable.get(key)));
        }
        DataType produced = DataTypeUtils.appendRowFields(physicalDataType, fields);
        TypeInformation<RowData> typeInfo = context.createTypeInformation(produced);
        MeterflowAvroDeserializationSchema.Positions positions = new MeterflowAvroDeserializationSchema.Positions(
                position(ERROR), position(RAW), position(REJECT), position(DIMENSIONS_KEY));
        return new MeterflowAvroDeserializationSchema(typeInfo, UsageEventDecoder.ARITY + metadataKeys.size(), positions, registryUrl, rules);
    }

    /** Where metadata {@code key} sits in the produced row, -1 when not requested. */
    private int position(String key) {
        int i = metadataKeys.indexOf(key);
        return i < 0 ? -1 : UsageEventDecoder.ARITY + i;
    }

    /** The table's physical columns must be the usage event row, names and types (nullable) alike. */
    static void checkPhysicalType(LogicalType physical) {
        LogicalType expected = LogicalTypeParser.parse(UsageEventDecoder.ROW_TYPE, MeterflowAvroDecodingFormat.class.getClassLoader());
        // The row itself is never null (the planner passes it NOT NULL); its columns are compared as they are.
        if (!expected.equals(physical.copy(true))) {
            throw new ValidationException(
                    "format '" + MeterflowAvroFormatFactory.IDENTIFIER + "' decodes avro/usage_event.avsc into "
                            + expected.asSerializableString() + "; the table's physical columns are "
                            + physical.asSerializableString());
        }
    }

    @Override
    public ChangelogMode getChangelogMode() {
        return ChangelogMode.insertOnly();
    }
}
