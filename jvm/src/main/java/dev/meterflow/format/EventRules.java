package dev.meterflow.format;

import java.io.Serializable;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Pattern;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.binary.BinaryStringData;

/**
 * The usage job's rules on a decoded event that depend on its configured meters (jobs/source_plan.py
 * {@code format_meters}): the ids are not blank, the meter is configured, a meter that does not allow
 * a negative quantity gets none; and the canonical key of the meter's group-by dimensions. Checked in
 * the source, once per record, on the decoded row, after the input contract ({@link InputContract}).
 *
 * <p>Reasons have exactly the wording the job's SQL validation had, in the same order; the key has
 * exactly the bytes of Python's {@code meterflow.corrections.dimensions_key}, which late-event
 * corrections build: jvm/src/test/resources/dimensions_key_cases.json holds the cases both sides
 * must agree on (tests/unit/test_dimensions_key_cases.py).
 */
public final class EventRules implements Serializable {

    private static final long serialVersionUID = 1L;

    /** The key of a meter with no group-by dimensions, and of a record that names no configured meter. */
    public static final String NO_DIMENSIONS = "{}";
    public static final String MISSING_FIELD = "missing field: ";

    private static final int I_METER = 3;
    private static final int I_QUANTITY = 4;
    private static final int I_DIMENSIONS = 6;
    private static final byte SPACE = 0x20;
    private static final StringData NO_DIMENSIONS_DATA = StringData.fromString(NO_DIMENSIONS);
    /** As meterflow/config.py's dimension names: nothing in them needs escaping in the key. */
    private static final Pattern DIMENSION_NAME = Pattern.compile("[A-Za-z0-9_.:-]{1,64}");
    private static final byte[] HEX = "0123456789abcdef".getBytes(StandardCharsets.US_ASCII);

    /** A configured meter: whether its quantity may be negative, its group-by dimensions sorted by name. */
    public record Meter(boolean allowNegative, List<String> groupBy) implements Serializable {
        private static final long serialVersionUID = 1L;
    }

    private final Map<String, Meter> meters;
    private transient Map<StringData, Compiled> byName;

    public EventRules(Map<String, Meter> meters) {
        Map<String, Meter> copy = new LinkedHashMap<>();
        meters.forEach((name, meter) -> {
            for (String dimension : meter.groupBy()) {
                if (!DIMENSION_NAME.matcher(dimension).matches()) {
                    throw new ValidationException("meter " + name + ": group-by dimension " + dimension + " is not 1 to 64 of [A-Za-z0-9_.:-]");
                }
            }
            List<String> sorted = new ArrayList<>(meter.groupBy());
            sorted.sort(null);
            copy.put(name, new Meter(meter.allowNegative(), List.copyOf(sorted)));
        });
        this.meters = copy;
    }

    /**
     * The format's {@code meters} option: a JSON object of meter name to
     * {@code {"allow_negative": bool, "group_by": [dimension, ...]}}.
     *
     * @throws ValidationException when it is not one, names no meter, or a meter lacks a key
     */
    public static EventRules parse(String json) {
        JsonNode root;
        try {
            root = new ObjectMapper().readTree(json);
        } catch (Exception e) {
            throw new ValidationException("'" + MeterflowAvroFormatFactory.METERS.key() + "' is not JSON: " + e.getMessage(), e);
        }
        if (root == null || !root.isObject() || root.isEmpty()) {
            throw new ValidationException("'" + MeterflowAvroFormatFactory.METERS.key() + "' must be a JSON object naming at least one meter, got " + json);
        }
        Map<String, Meter> meters = new LinkedHashMap<>();
        for (Map.Entry<String, JsonNode> entry : root.properties()) {
            JsonNode allowNegative = entry.getValue().get("allow_negative");
            JsonNode groupBy = entry.getValue().get("group_by");
            if (allowNegative == null || !allowNegative.isBoolean() || groupBy == null || !groupBy.isArray()) {
                throw new ValidationException("'" + MeterflowAvroFormatFactory.METERS.key() + "': meter " + entry.getKey()
                        + " needs \"allow_negative\" (true or false) and \"group_by\" (a list of dimension names), got " + entry.getValue());
            }
            List<String> dimensions = new ArrayList<>();
            groupBy.forEach(d -> dimensions.add(d.asText()));
            meters.put(entry.getKey(), new Meter(allowNegative.booleanValue(), dimensions));
        }
        return new EventRules(meters);
    }

    public Map<String, Meter> meters() {
        return meters;
    }

    /**
     * Why a decoded event cannot be counted under these rules, else null: the first blank id
     * ({@code missing field: event_id}, then tenant_id, customer_id, meter), then a meter not
     * configured, then a negative quantity for a meter that does not allow it.
     */
    public String reject(RowData row) {
        for (int i = 0; i < InputContract.ID_FIELDS.length; i++) {
            if (blank(row.getString(i))) {
                return MISSING_FIELD + InputContract.ID_FIELDS[i];
            }
        }
        StringData name = row.getString(I_METER);
        Compiled meter = compiled().get(name);
        if (meter == null) {
            return "unknown meter: " + name;
        }
        if (!meter.allowNegative) {
            DecimalData quantity = row.getDecimal(I_QUANTITY, UsageEventDecoder.PRECISION, UsageEventDecoder.SCALE);
            if (quantity.toBigDecimal().signum() < 0) {
                return "negative quantity: meter " + name + " does not allow it";
            }
        }
        return null;
    }

    /**
     * The group-by key of a decoded event: {@code {}} for a meter without group-by dimensions (or one not
     * configured), else a compact JSON object of the meter's dimensions, names sorted, a missing one as
     * the empty string, escaped as Python's {@code json.dumps(..., ensure_ascii=False)} escapes.
     */
    public StringData dimensionsKey(RowData row) {
        Compiled meter = compiled().get(row.getString(I_METER));
        if (meter == null || meter.groupBy.length == 0) {
            return NO_DIMENSIONS_DATA;
        }
        GenericMapData dimensions = (GenericMapData) row.getMap(I_DIMENSIONS);
        byte[][] values = new byte[meter.groupBy.length][];
        int size = meter.fixedBytes;
        for (int i = 0; i < values.length; i++) {
            Object value = dimensions.get(meter.groupBy[i]);
            values[i] = value == null ? new byte[0] : ((StringData) value).toBytes();
            size += escapedLength(values[i]);
        }
        byte[] key = new byte[size];
        int at = 0;
        for (int i = 0; i < values.length; i++) {
            byte[] prefix = meter.prefixes[i];
            System.arraycopy(prefix, 0, key, at, prefix.length);
            at = escape(values[i], key, at + prefix.length);
            key[at++] = '"';
        }
        key[at] = '}';
        return StringData.fromBytes(key);
    }

    private static boolean blank(StringData value) {
        BinaryStringData s = (BinaryStringData) value;
        int n = s.getSizeInBytes();
        for (int i = 0; i < n; i++) {
            if (s.byteAt(i) != SPACE) {
                return false;
            }
        }
        return true;
    }

    private static int escapedLength(byte[] value) {
        int n = value.length;
        for (byte b : value) {
            if (b == '"' || b == '\\' || b == '\b' || b == '\f' || b == '\n' || b == '\r' || b == '\t') {
                n += 1;
            } else if (b >= 0 && b < 0x20) {
                n += 5;
            }
        }
        return n;
    }

    /** Writes {@code value} escaped into {@code out} at {@code at}; returns the position after it. */
    private static int escape(byte[] value, byte[] out, int at) {
        for (byte b : value) {
            byte shortForm = switch (b) {
                case '"' -> '"';
                case '\\' -> '\\';
                case '\b' -> 'b';
                case '\f' -> 'f';
                case '\n' -> 'n';
                case '\r' -> 'r';
                case '\t' -> 't';
                default -> 0;
            };
            if (shortForm != 0) {
                out[at++] = '\\';
                out[at++] = shortForm;
            } else if (b >= 0 && b < 0x20) {
                out[at++] = '\\';
                out[at++] = 'u';
                out[at++] = '0';
                out[at++] = '0';
                out[at++] = HEX[b >> 4];
                out[at++] = HEX[b & 0xf];
            } else {
                out[at++] = b;
            }
        }
        return at;
    }

    private Map<StringData, Compiled> compiled() {
        if (byName == null) {
            Map<StringData, Compiled> compiled = new HashMap<>();
            meters.forEach((name, meter) -> compiled.put(materialized(name), new Compiled(meter)));
            byName = compiled;
        }
        return byName;
    }

    /** A key for lookups among decoded strings (compared by their bytes). */
    private static StringData materialized(String s) {
        return StringData.fromBytes(s.getBytes(StandardCharsets.UTF_8));
    }

    /** A meter's rules ready for per-record use: its dimension names as lookup keys, the key's fixed bytes. */
    private static final class Compiled {
        final boolean allowNegative;
        final StringData[] groupBy;
        /** {@code {"a":"}, then {@code ","b":"} ... : what precedes each value. */
        final byte[][] prefixes;
        /** The prefixes, each value's closing quote and the closing brace. */
        final int fixedBytes;

        Compiled(Meter meter) {
            allowNegative = meter.allowNegative();
            int n = meter.groupBy().size();
            groupBy = new StringData[n];
            prefixes = new byte[n][];
            int fixed = 1;
            for (int i = 0; i < n; i++) {
                String dimension = meter.groupBy().get(i);
                groupBy[i] = materialized(dimension);
                // DIMENSION_NAME: nothing to escape.
                prefixes[i] = ((i == 0 ? "{\"" : ",\"") + dimension + "\":\"").getBytes(StandardCharsets.UTF_8);
                fixed += prefixes[i].length + 1;
            }
            this.fixedBytes = fixed;
        }
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof EventRules that && meters.equals(that.meters);
    }

    @Override
    public int hashCode() {
        return meters.hashCode();
    }

    @Override
    public String toString() {
        return "EventRules" + meters;
    }
}
