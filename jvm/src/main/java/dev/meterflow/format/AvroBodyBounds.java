package dev.meterflow.format;

import org.apache.flink.avro.shaded.org.apache.avro.Schema;

/**
 * Checks that a binary Avro body is exactly one datum of a writer schema, every length and count
 * within its bytes, before Avro's generic reader sees it.
 *
 * <p>Why not let Avro find out: Avro 1.11's BinaryDecoder allocates a string's declared length before
 * reading it (a hostile length of 2 GB is an OutOfMemoryError), sizes a collection from its declared
 * count, and skips a negative length backwards. This walk reads nothing but varints and allocates
 * nothing, so resolving a checked body costs at most a few times its size.
 */
final class AvroBodyBounds {

    /** Nesting of schema types (record, union, array, map) a body may use; the usage event uses 3. */
    static final int MAX_DEPTH = 32;

    private byte[] buf;
    private int pos;
    private int end;
    /** Collection items the body may still declare: one per byte, which also bounds items of no bytes (null). */
    private long items;

    /** @return null when {@code buf[offset, offset + length)} is one datum of {@code schema}, else why not */
    String check(Schema schema, byte[] message, int offset, int length) {
        buf = message;
        pos = offset;
        end = offset + length;
        items = length;
        try {
            walk(schema, 0);
        } catch (Malformed e) {
            return "malformed Avro: " + e.getMessage() + " (writer schema " + schema.getFullName() + ")";
        } finally {
            buf = null;
        }
        return pos == end ? null : UsageEventDecoder.TRAILING;
    }

    private void walk(Schema schema, int depth) throws Malformed {
        if (depth > MAX_DEPTH) {
            throw new Malformed("nested deeper than " + MAX_DEPTH);
        }
        switch (schema.getType()) {
            case NULL -> { }
            case BOOLEAN -> skip(1);
            case INT -> readVarint(5);
            case LONG -> readVarint(10);
            case FLOAT -> skip(4);
            case DOUBLE -> skip(8);
            case FIXED -> skip(schema.getFixedSize());
            case STRING, BYTES -> skip(length());
            case ENUM -> index(schema.getEnumSymbols().size(), "enum symbol");
            case UNION -> walk(schema.getTypes().get(index(schema.getTypes().size(), "union branch")), depth + 1);
            case RECORD -> {
                for (Schema.Field field : schema.getFields()) {
                    walk(field.schema(), depth + 1);
                }
            }
            case ARRAY -> blocks(false, schema.getElementType(), depth + 1);
            case MAP -> blocks(true, schema.getValueType(), depth + 1);
            default -> throw new Malformed("unsupported type " + schema.getType());
        }
    }

    /** Array or map blocks (a map item is a string key and a value): a count (negative: then its byte size), that many items, until a 0 count. */
    private void blocks(boolean keyed, Schema value, int depth) throws Malformed {
        for (long count = readVarint(10); count != 0; count = readVarint(10)) {
            if (count < 0) {
                if (count == Long.MIN_VALUE) {
                    throw new Malformed("invalid block count");
                }
                count = -count;
                long size = readVarint(10);
                if (size < 0 || size > end - pos) {
                    throw new Malformed("truncated record: a block of " + size + " bytes");
                }
            }
            items -= count;
            if (items < 0) {
                throw new Malformed("truncated record: a block of " + count + " items cannot fit");
            }
            for (long i = 0; i < count; i++) {
                if (keyed) {
                    skip(length());
                }
                walk(value, depth);
            }
        }
    }

    private int index(int size, String what) throws Malformed {
        long i = readVarint(5);
        if (i < 0 || i >= size) {
            throw new Malformed(what + " " + i + " out of range");
        }
        return (int) i;
    }

    private long length() throws Malformed {
        long n = readVarint(10);
        if (n < 0) {
            throw new Malformed("negative length " + n);
        }
        return n;
    }

    private void skip(long n) throws Malformed {
        if (n > end - pos) {
            throw new Malformed("truncated record");
        }
        pos += (int) n;
    }

    /** A zig-zag varint of at most {@code maxBytes} bytes (5 for an int, 10 for a long). */
    private long readVarint(int maxBytes) throws Malformed {
        long value = 0;
        for (int i = 0; i < maxBytes; i++) {
            if (pos >= end) {
                throw new Malformed("truncated record");
            }
            int b = buf[pos++];
            value |= (long) (b & 0x7f) << (7 * i);
            if (b >= 0) {
                return (value >>> 1) ^ -(value & 1);
            }
        }
        throw new Malformed("varint longer than " + maxBytes + " bytes");
    }

    /** Cheap (no stack trace), caught in check. */
    private static final class Malformed extends Exception {
        private static final long serialVersionUID = 1L;

        Malformed(String reason) {
            super(reason, null, false, false);
        }
    }
}
