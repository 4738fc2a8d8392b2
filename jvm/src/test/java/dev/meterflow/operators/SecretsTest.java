package dev.meterflow.operators;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.ObjectOutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;

import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The TaskManager reads the password from its environment, a mounted file or the secrets file; the sink carries none. */
class SecretsTest {
    private static final String VAR = "METERFLOW_POSTGRES_PASSWORD";

    @TempDir Path dir;

    private Path dotenv(String content) throws IOException {
        Path file = dir.resolve("secrets.env");
        Files.write(file, content.getBytes(StandardCharsets.UTF_8));
        return file;
    }

    @Test
    void environmentWinsOverFileAndSecretsFile() throws IOException {
        Path mounted = Files.write(dir.resolve("pw"), "from-file\n".getBytes(StandardCharsets.UTF_8));
        Secrets secrets = new Secrets(VAR, dotenv(VAR + "=from-dotenv\n").toString());
        assertEquals("from-env", secrets.resolve(Map.of(VAR, "from-env", VAR + "_FILE", mounted.toString())));
        assertEquals("from-file", secrets.resolve(Map.of(VAR + "_FILE", mounted.toString())));
        assertEquals("from-dotenv", secrets.resolve(Map.of()));
    }

    @Test
    void dotenvKeepsTheLastLineOfTheKeyAndStripsQuotes() throws IOException {
        Path file = dotenv("# generated\nOTHER=x\n" + VAR + "=first\n " + VAR + " = 'second=with=equals' \n");
        assertEquals("second=with=equals", new Secrets(VAR, file.toString()).resolve(Map.of()));
    }

    @Test
    void missingEverywhereNamesWhereItLooked() {
        Secrets secrets = new Secrets(VAR, dir.resolve("absent.env").toString());
        IllegalStateException e = assertThrows(IllegalStateException.class, () -> secrets.resolve(Map.of("UNRELATED", "x")));
        assertTrue(e.getMessage().contains(VAR + "_FILE"), e.getMessage());
        assertTrue(e.getMessage().contains("absent.env"), e.getMessage());
    }

    @Test
    void aNamedFileThatCannotBeReadIsAnError() {
        Secrets secrets = new Secrets(VAR, "");
        assertThrows(IllegalStateException.class, () -> secrets.resolve(Map.of(VAR + "_FILE", dir.resolve("nope").toString())));
    }

    @Test
    void theSerializedSinkHoldsNoPassword() throws IOException {
        String password = "s3cr3t-only-on-the-taskmanager";
        UsageWindowSink sink = new UsageWindowSink("jdbc:postgresql://127.0.0.1:5433/meterflow", "meterflow", new Secrets(VAR, dotenv(VAR + "=" + password + "\n").toString()), "INSERT", true);
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        try (ObjectOutputStream out = new ObjectOutputStream(bytes)) {
            out.writeObject(sink);
        }
        String serialized = new String(bytes.toByteArray(), StandardCharsets.ISO_8859_1);
        assertFalse(serialized.contains(password));
        assertTrue(serialized.contains(VAR));
    }
}
