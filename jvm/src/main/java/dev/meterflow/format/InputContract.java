package dev.meterflow.format;

import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.util.Locale;

/**
 * The input contract (meterflow/input_contract.py): what a usage event may contain, checked on the
 * decoded message's UTF-8 bytes before anything is stored. Every reason has exactly the wording of
 * Python's {@code contract_violation}; tests/unit/test_input_contract.py keeps the constants equal
 * and jvm/src/test/resources/input_contract_cases.json holds the cases both sides must agree on.
 *
 * <p>Checks read bytes in place and allocate nothing unless they return a reason. The bytes are
 * valid UTF-8 (the decoder checks it first), so code points are counted by their lead bytes.
 */
public final class InputContract {

    // UTF-8 byte lengths of the identifying strings, at most (an empty one is a "missing field" later).
    public static final int MAX_EVENT_ID_BYTES = 128;
    public static final int MAX_TENANT_ID_BYTES = 64;
    public static final int MAX_CUSTOMER_ID_BYTES = 128;
    public static final int MAX_METER_BYTES = 64;
    public static final int MAX_DIMENSIONS = 16;
    public static final int MAX_DIMENSION_KEY_BYTES = 64;
    public static final int MAX_DIMENSION_VALUE_BYTES = 128;
    public static final BigDecimal MAX_ABS_QUANTITY = new BigDecimal("1000000000000000");

    /** The ids in the order they are checked (the schema's order), with their limits. */
    static final String[] ID_FIELDS = {"event_id", "tenant_id", "customer_id", "meter"};
    static final int[] MAX_ID_BYTES = {MAX_EVENT_ID_BYTES, MAX_TENANT_ID_BYTES, MAX_CUSTOMER_ID_BYTES, MAX_METER_BYTES};

    private static final BigDecimal MIN_QUANTITY = MAX_ABS_QUANTITY.negate();
    private static final String QUANTITY_REASON = "contract: |quantity| exceeds " + MAX_ABS_QUANTITY.toPlainString();

    private InputContract() {}

    /** Why id {@code i} (0 = event_id .. 3 = meter) breaks the contract, else null. */
    public static String checkId(int i, byte[] buf, int start, int length) {
        return checkText(ID_FIELDS[i], buf, start, length, 0, MAX_ID_BYTES[i]);
    }

    public static String checkDimensionCount(int count) {
        return count > MAX_DIMENSIONS ? "contract: " + count + " dimensions, at most " + MAX_DIMENSIONS : null;
    }

    public static String checkDimensionKey(byte[] buf, int start, int length) {
        return checkText("dimension key", buf, start, length, 1, MAX_DIMENSION_KEY_BYTES);
    }

    /** The value of a dimension whose key passed {@link #checkDimensionKey}. */
    public static String checkDimensionValue(byte[] buf, int keyStart, int keyLength, int start, int length) {
        if (length <= MAX_DIMENSION_VALUE_BYTES && controlCharacter(buf, start, length) < 0) {
            return null;
        }
        // Only now build the name: a valid key is at most 64 bytes, so the reason stays short.
        String name = "dimension " + pythonRepr(new String(buf, keyStart, keyLength, StandardCharsets.UTF_8));
        return checkText(name, buf, start, length, 0, MAX_DIMENSION_VALUE_BYTES);
    }

    /** |quantity| at most {@link #MAX_ABS_QUANTITY}; compares without allocating. */
    public static String checkQuantity(BigDecimal quantity) {
        return quantity.compareTo(MAX_ABS_QUANTITY) > 0 || quantity.compareTo(MIN_QUANTITY) < 0 ? QUANTITY_REASON : null;
    }

    static String checkText(String name, byte[] buf, int start, int length, int low, int high) {
        if (length > high) {
            return "contract: " + name + " is " + length + " bytes, at most " + high;
        }
        if (length < low) {
            return "contract: " + name + " is " + length + " bytes, at least " + low;
        }
        int at = controlCharacter(buf, start, length);
        if (at < 0) {
            return null;
        }
        int code = buf[at] == (byte) 0xC2 ? buf[at + 1] & 0xff : buf[at] & 0xff;
        return String.format(Locale.ROOT, "contract: %s has control character U+%04X at character %d", name, code, codePoints(buf, start, at));
    }

    /**
     * Offset in {@code buf} of the first control character (Unicode category Cc: C0 and DEL are the
     * bytes 0x00..0x1F and 0x7F, C1 is 0xC2 followed by 0x80..0x9F), else -1.
     */
    static int controlCharacter(byte[] buf, int start, int length) {
        int end = start + length;
        for (int i = start; i < end; i++) {
            int b = buf[i] & 0xff;
            if (b < 0x20 || b == 0x7f || (b == 0xc2 && i + 1 < end && (buf[i + 1] & 0xff) <= 0x9f)) {
                return i;
            }
        }
        return -1;
    }

    /** Code points in buf[start, end): every byte that is not a continuation byte starts one. */
    static int codePoints(byte[] buf, int start, int end) {
        int n = 0;
        for (int i = start; i < end; i++) {
            if ((buf[i] & 0xc0) != 0x80) {
                n++;
            }
        }
        return n;
    }

    /**
     * Python's {@code repr(str)}: single quotes unless the text holds a single quote and no double
     * one; backslash, the quote, and characters Python does not print (categories Cc, Cf, Cs, Co,
     * Cn, Zl, Zp, Zs but the space) escaped as \xhh, \\uhhhh or \\Uhhhhhhhh. Java 17 knows Unicode
     * 13 and Python 3.11 Unicode 14: a character assigned in between is escaped here, printed there.
     */
    static String pythonRepr(String text) {
        char quote = text.indexOf('\'') >= 0 && text.indexOf('"') < 0 ? '"' : '\'';
        StringBuilder out = new StringBuilder(text.length() + 2).append(quote);
        for (int i = 0; i < text.length(); ) {
            int c = text.codePointAt(i);
            i += Character.charCount(c);
            if (c == quote || c == '\\') {
                out.append('\\').appendCodePoint(c);
            } else if (c == '\t') {
                out.append("\\t");
            } else if (c == '\n') {
                out.append("\\n");
            } else if (c == '\r') {
                out.append("\\r");
            } else if (c < 0x20 || c == 0x7f) {
                out.append(String.format(Locale.ROOT, "\\x%02x", c));
            } else if (c < 0x7f || printable(c)) {
                out.appendCodePoint(c);
            } else if (c <= 0xff) {
                out.append(String.format(Locale.ROOT, "\\x%02x", c));
            } else if (c <= 0xffff) {
                out.append(String.format(Locale.ROOT, "\\u%04x", c));
            } else {
                out.append(String.format(Locale.ROOT, "\\U%08x", c));
            }
        }
        return out.append(quote).toString();
    }

    private static boolean printable(int c) {
        switch (Character.getType(c)) {
            case Character.CONTROL:
            case Character.FORMAT:
            case Character.SURROGATE:
            case Character.PRIVATE_USE:
            case Character.UNASSIGNED:
            case Character.LINE_SEPARATOR:
            case Character.PARAGRAPH_SEPARATOR:
            case Character.SPACE_SEPARATOR:
                return false;
            default:
                return true;
        }
    }
}
