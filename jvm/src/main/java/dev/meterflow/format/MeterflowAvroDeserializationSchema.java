package dev.meterflow.format;

import java.io.Serializable;
import java.util.Objects;

import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;

/**
 * The {@code meterflow-avro} runtime decoder. Never fails on input: every message becomes one row,
 * the usage event's fields, or all of them null and {@code error} set to the reason. Plain,
 * single-object and schema-registry framed values alike ({@link FramedValueDecoder}). With the
 * meters' rules, a decoded event is also checked ({@code reject}) and keyed ({@code dimensions-key}).
 */
public final class MeterflowAvroDeserializationSchema implements DeserializationSchema<RowData> {

    private static final long serialVersionUID = 1L;
    private static final byte[] NO_BYTES = new byte[0];

    private static final StringData NO_DIMENSIONS = StringData.fromString(EventRules.NO_DIMENSIONS);

    /** Where each metadata column sits in the produced row, -1 when not requested. */
    public record Positions(int error, int raw, int reject, int dimensionsKey) implements Serializable {
        private static final long serialVersionUID = 1L;
    }

    private final TypeInformation<RowData> producedType;
    private final int arity;
    private final Positions at;
    /** The schema registry's base URL, or null: then registry-framed values are dead letters. */
    private final String registryUrl;
    /** The meters' rules, or null when neither {@code reject} nor {@code dimensions-key} is requested. */
    private final EventRules rules;
    private transient FramedValueDecoder decoder;

    /**
     * @param arity physical fields plus requested metadata
     * @param at positions of the requested metadata
     * @param registryUrl the {@code schema-registry.url} format option, or null
     * @param rules the {@code meters} format option's rules, or null
     */
    public MeterflowAvroDeserializationSchema(TypeInformation<RowData> producedType, int arity, Positions at, String registryUrl, EventRules rules) {
        this.producedType = producedType;
        this.arity = arity;
        this.at = at;
        this.registryUrl = registryUrl;
        this.rules = rules;
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
        if (reason != null && at.error() >= 0) {
            row.setField(at.error(), StringData.fromString(reason));
        }
        if (at.raw() >= 0) {
            row.setField(at.raw(), message == null ? NO_BYTES : message);
        }
        if (at.reject() >= 0) {
            String reject = reason != null ? reason : rules.reject(row);
            row.setField(at.reject(), reject == null ? null : StringData.fromString(reject));
        }
        if (at.dimensionsKey() >= 0) {
            row.setField(at.dimensionsKey(), reason != null ? NO_DIMENSIONS : rules.dimensionsKey(row));
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
        return arity == that.arity && at.equals(that.at) && producedType.equals(that.producedType)
                && Objects.equals(registryUrl, that.registryUrl) && Objects.equals(rules, that.rules);
    }

    @Override
    public int hashCode() {
        return Objects.hash(producedType, arity, at, registryUrl, rules);
    }
}
