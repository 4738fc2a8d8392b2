package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;

import org.junit.jupiter.api.Test;

/** A dead letter is bounded whatever was sent: the reason by CountDeadLetter, the payload by BoundedPayload. */
class DeadLetterBoundsTest {
    private static final int MAX = CountDeadLetter.MAX_REASON_CHARS;
    private static final String MARK = "\u2026 (reason cut at " + MAX + " characters)";
    private static final String EMOJI = "\uD83D\uDCA5"; // U+1F4A5: one code point, two UTF-16 units, four UTF-8 bytes

    @Test
    void reasonAtTheLimitIsKept() {
        String reason = "unknown meter: " + "m".repeat(MAX - 15);
        assertEquals(MAX, reason.length());
        assertSame(reason, CountDeadLetter.boundReason(reason, MAX));
    }

    @Test
    void reasonOnePastTheLimitIsCutAndMarked() {
        String reason = "unknown meter: " + "m".repeat(MAX - 14);
        assertEquals("unknown meter: " + "m".repeat(MAX - 15) + MARK, CountDeadLetter.boundReason(reason, MAX));
    }

    @Test
    void theLimitCountsCharactersNotUtf16Units() {
        // MAX code points in 2 * MAX UTF-16 units: at the limit, kept whole.
        String reason = EMOJI.repeat(MAX);
        assertSame(reason, CountDeadLetter.boundReason(reason, MAX));
        // One past: MAX whole emoji kept.
        assertEquals(EMOJI.repeat(MAX) + MARK, CountDeadLetter.boundReason(EMOJI.repeat(MAX + 1), MAX));
    }

    @Test
    void aMultiByteCharacterAtTheCutIsNeverSplit() {
        // Character MAX is a surrogate pair: it is kept whole (it is within the limit), the rest goes.
        String reason = "x".repeat(MAX - 1) + EMOJI + "tail";
        String cut = CountDeadLetter.boundReason(reason, MAX);
        assertEquals("x".repeat(MAX - 1) + EMOJI + MARK, cut);
        // What is kept is valid text: it survives UTF-8 (a lone surrogate would become '?').
        assertEquals(cut, new String(cut.getBytes(StandardCharsets.UTF_8), StandardCharsets.UTF_8));
        // The pair just past the limit goes whole: no lone high surrogate is left behind.
        assertEquals("x".repeat(MAX) + MARK, CountDeadLetter.boundReason("x".repeat(MAX) + EMOJI, MAX));
        // 2-byte and 3-byte UTF-8 characters are one code point each.
        String wide = "é€".repeat(MAX / 2) + "é";
        assertEquals("é€".repeat(MAX / 2) + MARK, CountDeadLetter.boundReason(wide, MAX));
    }

    @Test
    void noReasonStaysNone() {
        assertNull(CountDeadLetter.boundReason(null, MAX));
        assertNull(new CountDeadLetter().eval(null, new byte[3], 2));
    }

    @Test
    void payloadAtTheLimitIsKept() {
        byte[] payload = new byte[64];
        Arrays.fill(payload, (byte) 7);
        assertSame(payload, BoundedPayload.cut(payload, 64));
        assertSame(payload, new BoundedPayload().eval(payload, 64));
        assertEquals("", CountDeadLetter.payloadNote(payload, 64));
        assertEquals("malformed Avro: x", new CountDeadLetter().eval("malformed Avro: x", payload, 64));
    }

    @Test
    void payloadOnePastTheLimitIsCutAndTheReasonSaysSo() {
        byte[] payload = new byte[65];
        for (int i = 0; i < payload.length; i++) {
            payload[i] = (byte) i;
        }
        assertArrayEquals(Arrays.copyOf(payload, 64), BoundedPayload.cut(payload, 64));
        assertEquals("; payload cut to 64 of 65 bytes", CountDeadLetter.payloadNote(payload, 64));
        assertEquals("malformed Avro: x; payload cut to 64 of 65 bytes", new CountDeadLetter().eval("malformed Avro: x", payload, 64));
        assertNull(BoundedPayload.cut(null, 64));
        assertEquals("", CountDeadLetter.payloadNote(null, 64));
    }

    @Test
    void aReasonAndPayloadBothCutStayBounded() {
        String reason = new CountDeadLetter().eval("unknown meter: " + EMOJI.repeat(900_000), new byte[2_000_000], 1_048_576);
        assertTrue(reason.startsWith("unknown meter: " + EMOJI));
        assertTrue(reason.endsWith(MARK + "; payload cut to 1048576 of 2000000 bytes"), reason);
        assertTrue(reason.getBytes(StandardCharsets.UTF_8).length < 4 * MAX + 100);
    }

    @Test
    void aMetricKindIsTheFixedTextBeforeTheColonAndTheirNumberIsCapped() {
        assertEquals("unknown_meter", CountDeadLetter.kindOf("unknown meter: " + "m".repeat(64)));
        assertEquals("contract", CountDeadLetter.kindOf("contract: event_id is 3000 bytes, at most 128"));
        assertEquals(CountDeadLetter.MAX_KIND_CHARS, CountDeadLetter.kindOf("k".repeat(500)).length());
        java.util.Set<String> counted = new java.util.HashSet<>();
        for (int i = 0; i < CountDeadLetter.MAX_KINDS - 1; i++) {
            counted.add("kind_" + i);
        }
        assertEquals("new", CountDeadLetter.countedKind(counted, "new: x"), "the last kind under the cap");
        counted.add("new");
        assertEquals(CountDeadLetter.OTHER_KIND, CountDeadLetter.countedKind(counted, "newer: x"), "one past the cap");
        assertEquals("kind_3", CountDeadLetter.countedKind(counted, "kind 3: x"), "a kind already counted keeps its counter");
    }
}
