package dev.meterflow.format;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;

/**
 * Decodes one plain-Avro usage event (avro/usage_event.avsc, binary encoding, no framing) field by
 * field into Flink's internal data structures, without an intermediate Avro record.
 *
 * <p>One instance is reused for every record of a task. It never throws on bad input: {@link
 * #decodeInto} returns the reason a message is not a usage event, and leaves the row's fields null.
 * Strings are zero-copy slices of the message (checked to be UTF-8); the quantity stays an exact
 * decimal.
 *
 * <p>A well-formed event that breaks the input contract ({@link InputContract}: sizes, control
 * characters, |quantity|) is rejected too, with the contract's reason. The contract is checked on
 * the bytes while they are read, in wire order (the order Python's contract_violation iterates a
 * decoded map), and reported only when the message is otherwise a usage event.
 */
public final class UsageEventDecoder {

    /**
     * The decoded row: every .avsc field in binary-layout order, nullable (a malformed record has
     * none). Kept in step with connectors/avro_types.py derive_columns by
     * tests/unit/test_jvm_contract.py, and with the bundled .avsc by UsageEventDecoderTest.
     */
    public static final String ROW_TYPE =
            "ROW<`event_id` STRING, `tenant_id` STRING, `customer_id` STRING, `meter` STRING, "
                    + "`quantity` DECIMAL(38, 9), `event_time` TIMESTAMP(3), "
                    + "`dimensions` MAP<STRING, STRING>>";

    public static final String[] FIELDS = {
        "event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions"
    };
    public static final int ARITY = FIELDS.length;
    public static final int PRECISION = 38;
    public static final int SCALE = 9;

    /** TIMESTAMP(3) holds years 1 to 9999: 0001-01-01T00:00:00.000 to 9999-12-31T23:59:59.999 UTC. */
    public static final long MIN_EVENT_TIME_MS = -62_135_596_800_000L;
    public static final long MAX_EVENT_TIME_MS = 253_402_300_799_999L;

    public static final String EMPTY = "malformed Avro: empty message";
    public static final String TRAILING = "malformed Avro: trailing bytes after the record";
    public static final String QUANTITY_OVERFLOW = "quantity exceeds decimal(" + PRECISION + ", " + SCALE + ")";

    private static final int I_QUANTITY = 4;
    private static final int I_EVENT_TIME = 5;
    private static final int I_DIMENSIONS = 6;

    private final CharsetDecoder utf8 = StandardCharsets.UTF_8.newDecoder();
    private byte[] buf;
    private int pos;
    private int end;
    private int field;
    /** Where the last string read starts in buf, and its byte length. */
    private int strStart;
    private int strLength;
    /** The first id and the first dimension that break the contract in the message being read. */
    private String idReason;
    private String dimensionReason;

    /**
     * Decodes {@code message} into fields 0..{@link #ARITY}-1 of {@code row}.
     *
     * @return null for a usage event (the fields are set), else why it is not one (the fields stay
     *     untouched, i.e. null in a new row)
     */
    public String decodeInto(byte[] message, GenericRowData row) {
        if (message == null || message.length == 0) {
            return EMPTY;
        }
        buf = message;
        pos = 0;
        end = message.length;
        idReason = null;
        dimensionReason = null;
        StringData eventId;
        StringData tenantId;
        StringData customerId;
        StringData meter;
        DecimalData quantity;
        long eventTimeMs;
        GenericMapData dimensions;
        try {
            eventId = readId(0);
            tenantId = readId(1);
            customerId = readId(2);
            meter = readId(3);
            field = I_QUANTITY;
            quantity = readDecimal();
            field = I_EVENT_TIME;
            eventTimeMs = readLong();
            field = I_DIMENSIONS;
            dimensions = readStringMap();
        } catch (Malformed e) {
            return "malformed Avro: " + e.getMessage() + " in field " + FIELDS[field];
        } finally {
            buf = null;
        }
        if (pos != end) {
            return TRAILING;
        }
        if (quantity == null) {
            return QUANTITY_OVERFLOW;
        }
        if (eventTimeMs < MIN_EVENT_TIME_MS || eventTimeMs > MAX_EVENT_TIME_MS) {
            return "event_time out of range: " + eventTimeMs + " ms since the epoch is outside TIMESTAMP(3) (years 1 to 9999)";
        }
        // The contract's order: ids, the number of dimensions, each dimension, the quantity.
        String contract = idReason != null ? idReason : InputContract.checkDimensionCount(dimensions.size());
        if (contract == null) {
            contract = dimensionReason != null ? dimensionReason : InputContract.checkQuantity(quantity.toBigDecimal());
        }
        if (contract != null) {
            return contract;
        }
        row.setField(0, eventId);
        row.setField(1, tenantId);
        row.setField(2, customerId);
        row.setField(3, meter);
        row.setField(I_QUANTITY, quantity);
        row.setField(I_EVENT_TIME, TimestampData.fromEpochMillis(eventTimeMs));
        row.setField(I_DIMENSIONS, dimensions);
        return null;
    }

    /** Avro long: zig-zag varint of at most 10 bytes. */
    private long readLong() throws Malformed {
        long value = 0;
        for (int shift = 0; ; shift += 7) {
            if (shift > 63) {
                throw new Malformed("varint longer than 10 bytes");
            }
            if (pos >= end) {
                throw new Malformed("truncated record");
            }
            int b = buf[pos++];
            value |= (long) (b & 0x7f) << shift;
            if (b >= 0) {
                return (value >>> 1) ^ -(value & 1);
            }
        }
    }

    /** Length of a string or bytes value, checked against what is left of the message. */
    private int readLength() throws Malformed {
        long n = readLong();
        if (n < 0) {
            throw new Malformed("negative length " + n);
        }
        if (n > end - pos) {
            throw new Malformed("truncated record");
        }
        return (int) n;
    }

    /** Id {@code i} of {@link InputContract#ID_FIELDS}, the first contract breach kept for later. */
    private StringData readId(int i) throws Malformed {
        field = i;
        StringData id = readString();
        if (idReason == null) {
            idReason = InputContract.checkId(i, buf, strStart, strLength);
        }
        return id;
    }

    private StringData readString() throws Malformed {
        int n = readLength();
        int start = pos;
        pos += n;
        strStart = start;
        strLength = n;
        for (int i = start; i < pos; i++) {
            if (buf[i] < 0) {
                checkUtf8(start, n);
                break;
            }
        }
        return StringData.fromBytes(buf, start, n);
    }

    private void checkUtf8(int start, int n) throws Malformed {
        try {
            utf8.reset();
            utf8.decode(ByteBuffer.wrap(buf, start, n));
        } catch (CharacterCodingException e) {
            throw new Malformed("invalid UTF-8");
        }
    }

    /** Avro decimal on bytes: big-endian two's complement unscaled value; null when over precision. */
    private DecimalData readDecimal() throws Malformed {
        int n = readLength();
        if (n == 0) {
            throw new Malformed("empty decimal");
        }
        BigDecimal value;
        if (n <= 8) {
            long unscaled = buf[pos]; // sign-extended
            for (int i = 1; i < n; i++) {
                unscaled = (unscaled << 8) | (buf[pos + i] & 0xff);
            }
            value = BigDecimal.valueOf(unscaled, SCALE);
        } else {
            value = new BigDecimal(new BigInteger(buf, pos, n), SCALE);
        }
        pos += n;
        return DecimalData.fromBigDecimal(value, PRECISION, SCALE);
    }

    /** Avro map of strings: blocks of (count, entries), a negative count followed by a byte size, 0 ends. */
    private GenericMapData readStringMap() throws Malformed {
        Map<StringData, StringData> map = null;
        for (long count = readLong(); count != 0; count = readLong()) {
            if (count < 0) {
                count = -count;
                readLong(); // the block's size in bytes, for skipping; not needed here
            }
            // Each entry takes at least two bytes (two lengths): a larger count cannot fit.
            if (count < 0 || count > (end - pos) / 2) {
                throw new Malformed("truncated record: a map block of " + count + " entries cannot fit");
            }
            if (map == null) {
                map = new HashMap<>((int) count * 2);
            }
            for (long i = 0; i < count; i++) {
                StringData key = readString();
                int keyStart = strStart;
                int keyLength = strLength;
                map.put(key, readString());
                // Every entry on the wire is checked, a repeated key's overwritten value too.
                if (dimensionReason == null) {
                    dimensionReason = InputContract.checkDimensionKey(buf, keyStart, keyLength);
                    if (dimensionReason == null) {
                        dimensionReason = InputContract.checkDimensionValue(buf, keyStart, keyLength, strStart, strLength);
                    }
                }
            }
        }
        return new GenericMapData(map == null ? Map.of() : map);
    }

    /** Why the bytes are not a usage event; cheap (no stack trace), caught in decodeInto. */
    private static final class Malformed extends Exception {
        private static final long serialVersionUID = 1L;

        Malformed(String reason) {
            super(reason, null, false, false);
        }
    }
}
