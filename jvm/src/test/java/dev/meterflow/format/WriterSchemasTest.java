package dev.meterflow.format;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.SchemaNormalization;
import org.junit.jupiter.api.Test;

/** The bundled schema history: the reader is v1, fingerprints as Python computes them. */
class WriterSchemasTest {

    /** The same values as tests/unit/test_schema_history.py asserts with fastavro: the two languages agree. */
    static final List<String> FINGERPRINTS = List.of("f95e3719ae243584", "2fbfd7beb502e9a4");

    static String text(String resource) {
        try (InputStream in = WriterSchemasTest.class.getResourceAsStream(resource)) {
            assertNotNull(in, resource + " is not in the jar");
            return new String(in.readAllBytes(), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    @Test
    void theReaderSchemaIsV1ByteForByte() {
        assertEquals(text(WriterSchemas.READER), text(String.format(WriterSchemas.HISTORY, 1)),
                "avro/history/usage_event-v1.avsc must stay a copy of avro/usage_event.avsc");
    }

    @Test
    void fingerprintsAreCrc64OfTheParsingCanonicalFormInHeaderByteOrder() {
        WriterSchemas schemas = WriterSchemas.load();
        List<String> got = new ArrayList<>();
        for (Schema writer : schemas.history()) {
            got.add(WriterSchemas.hex(SchemaNormalization.parsingFingerprint64(writer)));
        }
        assertEquals(FINGERPRINTS, got);
        assertEquals(FINGERPRINTS.get(0), WriterSchemas.hex(schemas.readerFingerprint()));
        // The Avro spec's example: "null" has fingerprint 0x63dd24e7cc258f8a, sent as 8a 8f 25 cc e7 24 dd 63.
        assertEquals("8a8f25cce724dd63", WriterSchemas.hex(SchemaNormalization.parsingFingerprint64(Schema.create(Schema.Type.NULL))));
    }

    @Test
    void everyHistoryWriterOtherThanTheReaderHasAResolver() {
        WriterSchemas schemas = WriterSchemas.load();
        assertNull(schemas.resolver(schemas.readerFingerprint()), "the reader's own fingerprint takes the fast path");
        for (Schema writer : schemas.history().subList(1, schemas.history().size())) {
            SchemaResolver resolver = schemas.resolver(SchemaNormalization.parsingFingerprint64(writer));
            assertNotNull(resolver);
            assertNull(resolver.incompatibility());
        }
    }
}
