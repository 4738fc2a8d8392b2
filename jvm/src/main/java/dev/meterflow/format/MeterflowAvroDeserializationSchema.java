package dev.meterflow.format;

import java.util.Objects;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;

/**
 * The {@code meterflow-avro} runtime decoder. Never fails on input: every message becomes one row,
 * the usage event's fields, or all of them null and {@code error} set to the reason. Plain,
 * single-object and schema-registry framed values alike ({@link FramedValueDecoder}).
 */
public final class MeterflowAvroDeserializationSchema implements DeserializationSchema<RowData> {

    private static final long serialVersionUID = 1L;
    private static final byte[] NO_BYTES = new byte[0];

    private final TypeInformation<RowData> producedType;
    private final int arity;
    private final int errorPos;
    private final int rawPos;
    /** The schema registry's base URL, or null: then registry-framed values are dead letters. */
    private final String registryUrl;
    private transient FramedValueDecoder decoder;

    /**
     * @param arity physical fields plus requested metadata
     * @param errorPos position of the {@code error} metadata
     * @param rawPos position of the {@code raw} metadata, -1 when not requested
     * @param registryUrl the {@code schema-registry.url} format option, or null
     */
    public MeterflowAvroDeserializationSchema(TypeInformation<RowData> producedType, int arity, int errorPos, int rawPos, String registryUrl) {
        this.producedType = producedType;
        this.arity = arity;
        this.errorPos = errorPos;
        this.rawPos = rawPos;
        this.registryUrl = registryUrl;
    }

    @Override
    public void open(InitializationContext context) {
        decoder = new FramedValueDecoder(registryUrl);
    }

    @Override
    public RowData deserialize(byte[] message) {
        if (decoder == null) {
            decoder = new FramedValueDecoder(registryUrl);
        }
        // A new row per record: the Kafka source copies its fields into the row it emits.
        GenericRowData row = new GenericRowData(arity);
        String reason = decoder.decodeInto(message, row);
        if (reason != null) {
            row.setField(errorPos, StringData.fromString(reason));
        }
        if (rawPos >= 0) {
            row.setField(rawPos, message == null ? NO_BYTES : message);
        }
        return row;
    }

    @Override
    public boolean isEndOfStream(RowData nextElement) {
        return false;
    }

    @Override
    public TypeInformation<RowData> getProducedType() {
        return producedType;
    }

    @Override
    public boolean equals(Object o) {
        if (!(o instanceof MeterflowAvroDeserializationSchema that)) {
            return false;
        }
        return arity == that.arity && errorPos == that.errorPos && rawPos == that.rawPos && producedType.equals(that.producedType)
                && Objects.equals(registryUrl, that.registryUrl);
    }

    @Override
    public int hashCode() {
        return Objects.hash(producedType, arity, errorPos, rawPos, registryUrl);
    }
}
