package dev.meterflow.operators;

import java.io.IOException;
import java.io.Serializable;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.Map;

/**
 * Where a secret is read on the TaskManager, so the job graph carries its name, never its value.
 *
 * <p>The same order as meterflow/config.py: the environment variable itself, then the file named
 * by {@code <VARIABLE>_FILE} (its whole content, as Docker and Kubernetes mount secrets), then a
 * {@code VARIABLE=value} line of the dotenv secrets file.
 */
public final class Secrets implements Serializable {
    private static final long serialVersionUID = 1L;

    private final String variable;
    private final String secretsFile;

    /**
     * @param variable the environment variable, e.g. {@code METERFLOW_POSTGRES_PASSWORD}
     * @param secretsFile the dotenv secrets file, or null or empty for none
     */
    public Secrets(String variable, String secretsFile) {
        this.variable = variable;
        this.secretsFile = secretsFile == null ? "" : secretsFile;
    }

    /** The secret as this process sees it; IllegalStateException naming where it was looked for. */
    public String resolve() {
        return resolve(System.getenv());
    }

    String resolve(Map<String, String> env) {
        String direct = env.get(variable);
        if (direct != null && !direct.isEmpty()) {
            return direct;
        }
        String fileName = env.get(variable + "_FILE");
        try {
            if (fileName != null && !fileName.isEmpty()) {
                return stripTrailingNewlines(new String(Files.readAllBytes(Paths.get(fileName)), StandardCharsets.UTF_8));
            }
            String fromDotenv = secretsFile.isEmpty() ? null : fromDotenv(Paths.get(secretsFile), variable);
            if (fromDotenv != null && !fromDotenv.isEmpty()) {
                return fromDotenv;
            }
        } catch (IOException e) {
            throw new IllegalStateException("cannot read " + variable + " on this TaskManager: " + e, e);
        }
        throw new IllegalStateException(
                "no " + variable + " on this TaskManager: set it, or " + variable + "_FILE, in the TaskManager's environment"
                        + (secretsFile.isEmpty() ? "" : ", or put it in " + secretsFile));
    }

    /** The value of {@code key} in a dotenv file (KEY=VALUE lines, # comments, quotes stripped); null if absent. */
    static String fromDotenv(Path file, String key) throws IOException {
        List<String> lines;
        try {
            lines = Files.readAllLines(file, StandardCharsets.UTF_8);
        } catch (NoSuchFileException e) {
            return null;
        }
        String value = null;
        for (String raw : lines) {
            String line = raw.trim();
            int eq = line.indexOf('=');
            if (line.isEmpty() || line.startsWith("#") || eq < 0 || !line.substring(0, eq).trim().equals(key)) {
                continue;
            }
            value = stripQuotes(line.substring(eq + 1).trim());
        }
        return value;
    }

    private static String stripQuotes(String value) {
        int start = 0;
        int end = value.length();
        while (start < end && (value.charAt(start) == '\'' || value.charAt(start) == '"')) {
            start++;
        }
        while (end > start && (value.charAt(end - 1) == '\'' || value.charAt(end - 1) == '"')) {
            end--;
        }
        return value.substring(start, end);
    }

    private static String stripTrailingNewlines(String value) {
        int end = value.length();
        while (end > 0 && (value.charAt(end - 1) == '\n' || value.charAt(end - 1) == '\r')) {
            end--;
        }
        return value.substring(0, end);
    }

    @Override
    public String toString() {
        return "Secrets(" + variable + (secretsFile.isEmpty() ? "" : ", " + secretsFile) + ")";
    }
}
