package dev.meterflow.stages;

import java.io.IOException;
import java.math.BigDecimal;
import java.math.BigInteger;

import org.apache.flink.api.common.typeutils.SimpleTypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.TypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.base.TypeSerializerSingleton;
import org.apache.flink.core.memory.DataInputView;
import org.apache.flink.core.memory.DataOutputView;

/**
 * The state serializer of {@link WindowPartial}, versioned: the second stage keeps a partial per
 * open window in keyed state, and a savepoint must restore into the next release. Each value starts
 * with its layout's version (one byte): a change of the layout gets a new {@link #VERSION}, and
 * {@link WindowPartial#readFrom} keeps reading the old ones.
 *
 * <p>Layout (version 1): version (byte), aggregation name (UTF), event count (long), then per aggregation:
 * SUM a flag and either the unscaled long or the BigDecimal; MAX a presence flag and the decimal;
 * LATEST a presence flag, the time, the id's bytes and the decimal; UNIQUE_COUNT the count and the
 * values. Decimals travel as their scale and unscaled bytes.
 */
public final class WindowPartialSerializer extends TypeSerializerSingleton<WindowPartial> {
    private static final long serialVersionUID = 1L;

    public static final int VERSION = 1;
    public static final WindowPartialSerializer INSTANCE = new WindowPartialSerializer();

    @Override
    public boolean isImmutableType() {
        return false;
    }

    @Override
    public WindowPartial createInstance() {
        return new WindowPartial(WindowPartial.Aggregation.SUM);
    }

    @Override
    public WindowPartial copy(WindowPartial from) {
        WindowPartial copy = new WindowPartial(from.aggregation());
        copy.merge(from);
        return copy;
    }

    @Override
    public WindowPartial copy(WindowPartial from, WindowPartial reuse) {
        return copy(from);
    }

    @Override
    public int getLength() {
        return -1;
    }

    @Override
    public void serialize(WindowPartial p, DataOutputView out) throws IOException {
        p.writeTo(out);
    }

    @Override
    public WindowPartial deserialize(DataInputView in) throws IOException {
        return WindowPartial.readFrom(in);
    }

    @Override
    public WindowPartial deserialize(WindowPartial reuse, DataInputView in) throws IOException {
        return deserialize(in);
    }

    @Override
    public void copy(DataInputView source, DataOutputView target) throws IOException {
        serialize(deserialize(source), target);
    }

    @Override
    public TypeSerializerSnapshot<WindowPartial> snapshotConfiguration() {
        return new Snapshot();
    }

    static void writeDecimal(BigDecimal d, DataOutputView out) throws IOException {
        byte[] unscaled = d.unscaledValue().toByteArray();
        out.writeInt(d.scale());
        out.writeInt(unscaled.length);
        out.write(unscaled);
    }

    static BigDecimal readDecimal(DataInputView in) throws IOException {
        int scale = in.readInt();
        byte[] unscaled = new byte[in.readInt()];
        in.readFully(unscaled);
        return new BigDecimal(new BigInteger(unscaled), scale);
    }

    /** The snapshot a savepoint stores: it names the serializer and its version. */
    public static final class Snapshot extends SimpleTypeSerializerSnapshot<WindowPartial> {
        public Snapshot() {
            super(() -> INSTANCE);
        }
    }
}
