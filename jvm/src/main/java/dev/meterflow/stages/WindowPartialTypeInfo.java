package dev.meterflow.stages;

import java.lang.reflect.Type;
import java.util.Map;

import org.apache.flink.api.common.serialization.SerializerConfig;
import org.apache.flink.api.common.typeinfo.TypeInfoFactory;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeutils.TypeSerializer;

/**
 * Flink's type of {@link WindowPartial}: serialized by {@link WindowPartialSerializer} between the
 * stages and in state, never by Kryo ({@link WindowPartial} names this through its {@link Factory}).
 */
public final class WindowPartialTypeInfo extends TypeInformation<WindowPartial> {
    private static final long serialVersionUID = 1L;

    /** How Flink's type extraction finds this type for a {@link WindowPartial} field or value. */
    public static final class Factory extends TypeInfoFactory<WindowPartial> {
        @Override
        public TypeInformation<WindowPartial> createTypeInfo(Type t, Map<String, TypeInformation<?>> genericParameters) {
            return new WindowPartialTypeInfo();
        }
    }

    @Override
    public boolean isBasicType() {
        return false;
    }

    @Override
    public boolean isTupleType() {
        return false;
    }

    @Override
    public int getArity() {
        return 1;
    }

    @Override
    public int getTotalFields() {
        return 1;
    }

    @Override
    public Class<WindowPartial> getTypeClass() {
        return WindowPartial.class;
    }

    @Override
    public boolean isKeyType() {
        return false;
    }

    @Override
    public TypeSerializer<WindowPartial> createSerializer(SerializerConfig config) {
        return WindowPartialSerializer.INSTANCE;
    }

    @Override
    public String toString() {
        return "WindowPartial";
    }

    @Override
    public boolean equals(Object obj) {
        return obj instanceof WindowPartialTypeInfo;
    }

    @Override
    public int hashCode() {
        return WindowPartialTypeInfo.class.hashCode();
    }

    @Override
    public boolean canEqual(Object obj) {
        return obj instanceof WindowPartialTypeInfo;
    }
}
