package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.table.api.DataTypes;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.connector.format.DecodingFormat;
import org.apache.flink.table.connector.source.DynamicTableSource;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.factories.DeserializationFormatFactory;
import org.apache.flink.table.factories.FactoryUtil;
import org.apache.flink.table.types.DataType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.utils.LogicalTypeParser;
import org.apache.flink.table.types.utils.TypeConversions;
import org.junit.jupiter.api.Test;

/** The format as the Kafka connector uses it: discovered by name, checked at planning, one row per message. */
class MeterflowAvroFormatTest {

    /** Enough of the planner's context for the format: it only asks for the produced type's information. */
    static final class Context implements DynamicTableSource.Context {
        DataType produced;

        @Override
        @SuppressWarnings("unchecked")
        public <T> TypeInformation<T> createTypeInformation(DataType producedDataType) {
            produced = producedDataType;
            return (TypeInformation<T>) TypeInformation.of(RowData.class);
        }

        @Override
        public <T> TypeInformation<T> createTypeInformation(LogicalType producedLogicalType) {
            return createTypeInformation(TypeConversions.fromLogicalToDataType(producedLogicalType));
        }

        @Override
        public DynamicTableSource.DataStructureConverter createDataStructureConverter(DataType producedDataType) {
            throw new UnsupportedOperationException();
        }
    }

    /** The table's physical row as the Kafka connector passes it: NOT NULL, of nullable columns. */
    static DataType physical() {
        return TypeConversions.fromLogicalToDataType(LogicalTypeParser.parse(UsageEventDecoder.ROW_TYPE + " NOT NULL", MeterflowAvroFormatTest.class.getClassLoader()));
    }

    static DeserializationSchema<RowData> decoder(Context context, List<String> metadata) throws Exception {
        MeterflowAvroDecodingFormat format = new MeterflowAvroDecodingFormat();
        format.applyReadableMetadata(metadata);
        DeserializationSchema<RowData> schema = format.createRuntimeDecoder(context, physical());
        schema.open(null);
        return schema;
    }

    @Test
    void factoryIsFoundByItsName() {
        DeserializationFormatFactory factory = FactoryUtil.discoverFactory(getClass().getClassLoader(), DeserializationFormatFactory.class, "meterflow-avro");
        assertInstanceOf(MeterflowAvroFormatFactory.class, factory);
    }

    @Test
    void producesTheEventFieldsThenTheRequestedMetadata() throws Exception {
        Context context = new Context();
        DeserializationSchema<RowData> schema = decoder(context, List.of("error", "raw"));
        assertEquals(
                DataTypes.ROW(
                        DataTypes.FIELD("event_id", DataTypes.STRING()), DataTypes.FIELD("tenant_id", DataTypes.STRING()),
                        DataTypes.FIELD("customer_id", DataTypes.STRING()), DataTypes.FIELD("meter", DataTypes.STRING()),
                        DataTypes.FIELD("quantity", DataTypes.DECIMAL(38, 9)), DataTypes.FIELD("event_time", DataTypes.TIMESTAMP(3)),
                        DataTypes.FIELD("dimensions", DataTypes.MAP(DataTypes.STRING(), DataTypes.STRING())),
                        DataTypes.FIELD("error", DataTypes.STRING()), DataTypes.FIELD("raw", DataTypes.BYTES())).notNull().getLogicalType(),
                context.produced.getLogicalType());

        byte[] good = UsageEventDecoderTest.good();
        RowData row = schema.deserialize(good);
        assertEquals(9, row.getArity());
        assertEquals(StringData.fromString("e1"), row.getString(0));
        assertTrue(row.isNullAt(7), "no error");
        assertSame(good, row.getBinary(8), "raw bytes as received, also for a good record");

        byte[] garbage = {1, 2, 3};
        RowData bad = schema.deserialize(garbage);
        assertInstanceOf(GenericRowData.class, bad);
        for (int i = 0; i < UsageEventDecoder.ARITY; i++) {
            assertTrue(bad.isNullAt(i));
        }
        assertTrue(bad.getString(7).toString().startsWith("malformed Avro: "));
        assertArrayEquals(garbage, bad.getBinary(8));
    }

    @Test
    void aNullValueIsAnEmptyMessageWithEmptyRawBytes() throws Exception {
        RowData row = decoder(new Context(), List.of("raw", "error")).deserialize(null);
        assertArrayEquals(new byte[0], row.getBinary(7));
        assertEquals(UsageEventDecoder.EMPTY, row.getString(8).toString());
    }

    @Test
    void metadataIsOptionalExceptTheErrorOrTheReject() throws Exception {
        RowData row = decoder(new Context(), List.of("error")).deserialize(new byte[] {7});
        assertEquals(8, row.getArity());
        assertTrue(row.getString(7).toString().startsWith("malformed Avro: "));
        ValidationException e = assertThrows(ValidationException.class, () -> decoder(new Context(), List.of("raw")));
        assertTrue(e.getMessage().contains("needs the 'error' or the 'reject' metadata column"), e.getMessage());
        ValidationException noMeters = assertThrows(ValidationException.class, () -> decoder(new Context(), List.of("reject")));
        assertTrue(noMeters.getMessage().contains("need the 'meters' option"), noMeters.getMessage());
    }

    @Test
    void theMetersOptionGivesEachRecordItsRejectAndItsGroupByKey() throws Exception {
        MeterflowAvroFormatFactory factory = new MeterflowAvroFormatFactory();
        assertTrue(factory.optionalOptions().contains(MeterflowAvroFormatFactory.METERS));
        String meters = "{\"tokens\":{\"allow_negative\":false,\"group_by\":[\"model\",\"region\"]},\"credits\":{\"allow_negative\":true,\"group_by\":[]}}";
        DecodingFormat<DeserializationSchema<RowData>> format = factory.createDecodingFormat(null, Configuration.fromMap(Map.of("meters", meters)));
        format.applyReadableMetadata(List.of("reject", "dimensions-key", "raw"));
        Context context = new Context();
        DeserializationSchema<RowData> schema = format.createRuntimeDecoder(context, physical());
        schema.open(null);
        LogicalType produced = context.produced.getLogicalType();
        assertEquals("STRING", produced.getChildren().get(7).asSummaryString());
        assertEquals("STRING NOT NULL", produced.getChildren().get(8).asSummaryString(), "a key on every row");

        RowData good = schema.deserialize(UsageEventDecoderTest.good());
        assertTrue(good.isNullAt(7));
        assertEquals("{\"model\":\"m\",\"region\":\"\"}", good.getString(8).toString());

        RowData negative = schema.deserialize(UsageEventDecoderTest.encode(UsageEventDecoderTest.event(
                UsageEventDecoderTest.SCHEMA, "e2", new java.math.BigDecimal("-1"), UsageEventDecoderTest.T, Map.of("region", "eu"))));
        assertEquals("negative quantity: meter tokens does not allow it", negative.getString(7).toString());
        assertEquals("{\"model\":\"\",\"region\":\"eu\"}", negative.getString(8).toString());

        RowData garbage = schema.deserialize(new byte[] {1, 2, 3});
        assertTrue(garbage.getString(7).toString().startsWith("malformed Avro: "), "a decode error is the reject");
        assertEquals("{}", garbage.getString(8).toString());

        // As the TaskManager gets it: Java-serialized with its rules.
        DeserializationSchema<RowData> shipped = org.apache.flink.util.InstantiationUtil.clone(schema);
        assertEquals(schema, shipped);
        RowData again = shipped.deserialize(UsageEventDecoderTest.good());
        assertTrue(again.isNullAt(7));
        assertEquals("{\"model\":\"m\",\"region\":\"\"}", again.getString(8).toString());

        ValidationException e = assertThrows(ValidationException.class,
                () -> factory.createDecodingFormat(null, Configuration.fromMap(Map.of("meters", "tokens"))));
        assertTrue(e.getMessage().startsWith("'meters' is not JSON"), e.getMessage());
    }

    @Test
    void tableColumnsMustBeTheEventRow() {
        DataType wrong = DataTypes.ROW(DataTypes.FIELD("payload", DataTypes.BYTES()));
        MeterflowAvroDecodingFormat format = new MeterflowAvroDecodingFormat();
        format.applyReadableMetadata(List.of("error"));
        ValidationException e = assertThrows(ValidationException.class, () -> format.createRuntimeDecoder(new Context(), wrong));
        assertTrue(e.getMessage().contains("decodes avro/usage_event.avsc into ROW<`event_id` VARCHAR"), e.getMessage());
        DataType floatQuantity = DataTypes.ROW(
                DataTypes.FIELD("event_id", DataTypes.STRING()), DataTypes.FIELD("tenant_id", DataTypes.STRING()),
                DataTypes.FIELD("customer_id", DataTypes.STRING()), DataTypes.FIELD("meter", DataTypes.STRING()),
                DataTypes.FIELD("quantity", DataTypes.DOUBLE()), DataTypes.FIELD("event_time", DataTypes.TIMESTAMP(3)),
                DataTypes.FIELD("dimensions", DataTypes.MAP(DataTypes.STRING(), DataTypes.STRING())));
        assertThrows(ValidationException.class, () -> format.createRuntimeDecoder(new Context(), floatQuantity));
    }

    @Test
    void theRegistryUrlOptionReachesTheRuntimeDecoder() throws Exception {
        MeterflowAvroFormatFactory factory = new MeterflowAvroFormatFactory();
        assertTrue(factory.optionalOptions().contains(MeterflowAvroFormatFactory.SCHEMA_REGISTRY_URL));
        assertEquals("schema-registry.url", MeterflowAvroFormatFactory.SCHEMA_REGISTRY_URL.key());
        byte[] registryFramed = {0, 0, 0, 0, 7, 2, 'x'};

        DecodingFormat<DeserializationSchema<RowData>> none = factory.createDecodingFormat(null, new Configuration());
        none.applyReadableMetadata(List.of("error"));
        DeserializationSchema<RowData> plainOnly = none.createRuntimeDecoder(new Context(), physical());
        plainOnly.open(null);
        assertEquals(FramedValueDecoder.NO_REGISTRY, plainOnly.deserialize(registryFramed).getString(7).toString());

        // A registry on a closed port: the option is used (the reason is the registry's, not "no registry configured").
        int closedPort;
        try (java.net.ServerSocket socket = new java.net.ServerSocket(0)) {
            closedPort = socket.getLocalPort();
        }
        String url = "http://127.0.0.1:" + closedPort;
        DecodingFormat<DeserializationSchema<RowData>> withRegistry =
                factory.createDecodingFormat(null, Configuration.fromMap(Map.of("schema-registry.url", " " + url + " ")));
        withRegistry.applyReadableMetadata(List.of("error"));
        DeserializationSchema<RowData> framed = withRegistry.createRuntimeDecoder(new Context(), physical());
        framed.open(null);
        assertTrue(framed.deserialize(registryFramed).getString(7).toString().startsWith("schema registry unreachable: schema id 7, "));
        assertEquals(new MeterflowAvroDeserializationSchema(TypeInformation.of(RowData.class), 8,
                new MeterflowAvroDeserializationSchema.Positions(7, -1, -1, -1), url, null), framed);
        assertTrue(!framed.equals(plainOnly), "the registry URL is part of the decoder's identity");

        for (String bad : List.of("ftp://registry", "registry:8081", "http://", "http://exa mple")) {
            ValidationException e = assertThrows(ValidationException.class,
                    () -> factory.createDecodingFormat(null, Configuration.fromMap(Map.of("schema-registry.url", bad))), bad);
            assertTrue(e.getMessage().startsWith("'schema-registry.url' "), e.getMessage());
        }
    }
}
