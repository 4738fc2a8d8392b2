package dev.meterflow.operators;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.Serializable;
import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.stream.Collectors;

import org.apache.flink.api.connector.sink2.Committer;
import org.apache.flink.api.connector.sink2.CommitterInitContext;
import org.apache.flink.api.connector.sink2.CommittingSinkWriter;
import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.SupportsCommitter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.core.io.SimpleVersionedSerializer;
import org.apache.flink.metrics.Counter;
import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;

/**
 * Writes window rows to Postgres transactionally with the checkpoints: nothing a failed attempt
 * computed is ever visible.
 *
 * <p>The writer keeps the newest row per window until the checkpoint barrier, then hands the batch
 * to the committer as a committable, which Flink stores in the checkpoint. Only when that
 * checkpoint has completed does the committer upsert the batch in one Postgres transaction. A
 * failure before completion discards the batch with the rest of the attempt (the replay recomputes
 * it); a failure after completion but before the commit re-commits the stored batch on restore.
 * Upserts are idempotent and the table's trigger keeps the newer revision and a final row final,
 * so committing a batch twice changes nothing. Cost: rows appear when the checkpoint completes
 * (freshness = checkpoint interval + checkpoint duration), not on a flush timer.
 *
 * <p>Input: the window aggregate's upsert changelog (window bounds as UTC LocalDateTime, open
 * rows) or the closer's closed windows (bounds as epoch ms, final rows); in the two-stage graph,
 * the second stage's fires (epoch ms, open rows) and finals. The upsert statement is
 * generated from the table's column contract in Python (sinks/postgres_schema.py) and binds, in
 * order: tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity,
 * event_count, revision, is_final.
 *
 * <p>The password is not part of the sink: the job graph carries only where the TaskManager reads
 * it ({@link Secrets}: its environment, a mounted secret file, or the secrets file), resolved when
 * the committer first connects.
 */
public class UsageWindowSink implements Sink<Row>, SupportsCommitter<UsageWindowSink.Batch> {
    private static final long serialVersionUID = 1L;

    private final String jdbcUrl;
    private final String user;
    private final Secrets password;
    private final String upsertSql;
    private final boolean finalRows;

    /**
     * @param finalRows true for closed windows ({@code is_final}: the closer's, the second stage's finals),
     *     false for provisional rows (the SQL aggregate's changelog, bounds as LocalDateTime, or the second stage's fires, in epoch ms)
     * @param password where the TaskManager reads the Postgres password
     */
    public UsageWindowSink(String jdbcUrl, String user, Secrets password, String upsertSql, boolean finalRows) {
        this.jdbcUrl = jdbcUrl;
        this.user = user;
        this.password = password;
        this.upsertSql = upsertSql;
        this.finalRows = finalRows;
    }

    @Override
    public SinkWriter<Row> createWriter(WriterInitContext context) {
        return new Writer(finalRows);
    }

    @Override
    public Committer<Batch> createCommitter(CommitterInitContext context) {
        Counter rows = context.metricGroup().counter("usageRowsCommitted");
        Counter failures = context.metricGroup().counter("usageCommitFailures");
        return new PostgresCommitter(jdbcUrl, user, password, upsertSql, rows, failures);
    }

    @Override
    public SimpleVersionedSerializer<Batch> getCommittableSerializer() {
        return new BatchSerializer();
    }

    /** One window's row as written. */
    public static final class WindowRow implements Serializable {
        private static final long serialVersionUID = 1L;
        final String tenantId;
        final String customerId;
        final String meter;
        final String dimensionsKey;
        final long windowStartMs;
        final long windowEndMs;
        final String quantity;
        final long eventCount;
        final long revision;
        final boolean isFinal;

        WindowRow(String tenantId, String customerId, String meter, String dimensionsKey, long windowStartMs, long windowEndMs, String quantity, long eventCount, long revision, boolean isFinal) {
            this.tenantId = tenantId;
            this.customerId = customerId;
            this.meter = meter;
            this.dimensionsKey = dimensionsKey;
            this.windowStartMs = windowStartMs;
            this.windowEndMs = windowEndMs;
            this.quantity = quantity;
            this.eventCount = eventCount;
            this.revision = revision;
            this.isFinal = isFinal;
        }

        String key() {
            return tenantId + "\u0000" + customerId + "\u0000" + meter + "\u0000" + dimensionsKey + "\u0000" + windowStartMs + "\u0000" + windowEndMs;
        }

        /** Whether this row may replace {@code other} of the same window in a batch. */
        boolean supersedes(WindowRow other) {
            return isFinal || (!other.isFinal && revision >= other.revision);
        }
    }

    /** The rows of one subtask between two checkpoints: the committable. */
    public static final class Batch {
        final List<WindowRow> rows;

        Batch(List<WindowRow> rows) {
            this.rows = rows;
        }

        public int size() {
            return rows.size();
        }
    }

    /** Keeps the newest row per window until the barrier. */
    static final class Writer implements CommittingSinkWriter<Row, Batch> {
        private final boolean finalRows;
        private final Map<String, WindowRow> pending = new LinkedHashMap<>();

        Writer(boolean finalRows) {
            this.finalRows = finalRows;
        }

        @Override
        public void write(Row row, Context context) {
            if (row.getKind() != RowKind.INSERT && row.getKind() != RowKind.UPDATE_AFTER) {
                return; // an upsert changelog carries each window's newest value as +I/+U
            }
            WindowRow w = toWindowRow(row, finalRows);
            WindowRow previous = pending.get(w.key());
            if (previous == null || w.supersedes(previous)) {
                pending.put(w.key(), w);
            }
        }

        @Override
        public void flush(boolean endOfInput) {}

        @Override
        public Collection<Batch> prepareCommit() {
            if (pending.isEmpty()) {
                return Collections.emptyList();
            }
            Batch batch = new Batch(new ArrayList<>(pending.values()));
            pending.clear();
            return Collections.singletonList(batch);
        }

        @Override
        public void close() {}
    }

    /** A window bound as epoch ms: the closer's and the stages' rows carry it so, the SQL aggregate's changelog as a UTC LocalDateTime. */
    private static long epochMs(Object bound) {
        return bound instanceof Long ms ? ms : WindowClose.epochMs(bound);
    }

    static WindowRow toWindowRow(Row row, boolean finalRow) {
        long start = epochMs(row.getField(4));
        long end = epochMs(row.getField(5));
        return new WindowRow(
                (String) row.getField(0), (String) row.getField(1), (String) row.getField(2), (String) row.getField(3),
                start, end, (String) row.getField(6), (Long) row.getField(7), (Long) row.getField(8), finalRow);
    }


    /** Attempts per commit when Postgres reports a deadlock or serialization failure. */
    static final int MAX_ATTEMPTS = 5;

    /**
     * The rows of several batches as one upsert: the newest row per window (batches of several
     * checkpoints may meet after a restore, and one statement must not touch a row twice), sorted
     * by key so that every committer of the job locks rows in the same order and two concurrent
     * commits (window updates and final rows) cannot deadlock.
     */
    static List<WindowRow> inLockOrder(Collection<Batch> batches) {
        Map<String, WindowRow> newest = new TreeMap<>();
        for (Batch batch : batches) {
            for (WindowRow w : batch.rows) {
                WindowRow previous = newest.get(w.key());
                if (previous == null || w.supersedes(previous)) {
                    newest.put(w.key(), w);
                }
            }
        }
        return new ArrayList<>(newest.values());
    }

    /** Deadlock (40P01) or serialization failure (40001): the same commit may simply be tried again. */
    static boolean isTransientConflict(SQLException e) {
        for (SQLException cur = e; cur != null; cur = cur.getNextException()) {
            if ("40P01".equals(cur.getSQLState()) || "40001".equals(cur.getSQLState())) {
                return true;
            }
        }
        return false;
    }

    /** Upserts a checkpoint's batches in one transaction once that checkpoint has completed. */
    static final class PostgresCommitter implements Committer<Batch> {
        private final String jdbcUrl;
        private final String user;
        private final Secrets password;
        private final String upsertSql;
        private final Counter rowsCommitted;
        private final Counter failures;
        private Connection connection;

        PostgresCommitter(String jdbcUrl, String user, Secrets password, String upsertSql, Counter rowsCommitted, Counter failures) {
            this.jdbcUrl = jdbcUrl;
            this.user = user;
            this.password = password;
            this.upsertSql = upsertSql;
            this.rowsCommitted = rowsCommitted;
            this.failures = failures;
        }

        @Override
        public void commit(Collection<CommitRequest<Batch>> requests) {
            if (requests.isEmpty()) {
                return;
            }
            List<WindowRow> rows = inLockOrder(requests.stream().map(CommitRequest::getCommittable).collect(Collectors.toList()));
            SQLException failure = null;
            for (int attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
                try {
                    upsert(rows);
                    rowsCommitted.inc(rows.size());
                    return;
                } catch (SQLException e) {
                    failures.inc();
                    closeConnection();
                    failure = e;
                    if (!isTransientConflict(e)) {
                        break;
                    }
                    sleepQuietly(100L * attempt);
                }
            }
            // The batches stay in the completed checkpoint: the job restarts from it and commits
            // them again, so a Postgres outage delays rows, never loses them.
            for (CommitRequest<Batch> request : requests) {
                request.signalFailedWithUnknownReason(new SQLException("committing usage windows to Postgres failed: " + failure.getMessage(), failure));
            }
        }

        private void upsert(List<WindowRow> rows) throws SQLException {
            Connection c = connection();
            try (PreparedStatement ps = c.prepareStatement(upsertSql)) {
                for (WindowRow w : rows) {
                    bind(ps, w);
                    ps.addBatch();
                }
                ps.executeBatch();
            }
            c.commit();
        }

        private static void sleepQuietly(long ms) {
            try {
                Thread.sleep(ms);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }

        private static void bind(PreparedStatement ps, WindowRow w) throws SQLException {
            ps.setString(1, w.tenantId);
            ps.setString(2, w.customerId);
            ps.setString(3, w.meter);
            ps.setString(4, w.dimensionsKey);
            ps.setObject(5, utc(w.windowStartMs));
            ps.setObject(6, utc(w.windowEndMs));
            ps.setBigDecimal(7, new BigDecimal(w.quantity));
            ps.setLong(8, w.eventCount);
            ps.setLong(9, w.revision);
            ps.setBoolean(10, w.isFinal);
        }

        private static LocalDateTime utc(long ms) {
            return LocalDateTime.ofInstant(Instant.ofEpochMilli(ms), ZoneOffset.UTC);
        }

        private Connection connection() throws SQLException {
            if (connection == null) {
                Properties props = new Properties();
                props.setProperty("user", user);
                props.setProperty("password", password.resolve());
                // Fail fast (seconds, not minutes) so a dead server leads to a restart, not a hung task.
                props.setProperty("connectTimeout", "5");
                props.setProperty("socketTimeout", "60");
                props.setProperty("reWriteBatchedInserts", "true");
                connection = DriverManager.getConnection(jdbcUrl, props);
                connection.setAutoCommit(false);
            }
            return connection;
        }

        private void closeConnection() {
            if (connection != null) {
                try {
                    connection.close();
                } catch (SQLException ignored) {
                    // the connection is broken already; the original failure is what matters
                }
                connection = null;
            }
        }

        @Override
        public void close() {
            closeConnection();
        }
    }

    /** Committables go into checkpoints: a compact, versioned binary form. */
    static final class BatchSerializer implements SimpleVersionedSerializer<Batch> {
        @Override
        public int getVersion() {
            return 1;
        }

        @Override
        public byte[] serialize(Batch batch) throws IOException {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream();
            try (DataOutputStream out = new DataOutputStream(bytes)) {
                out.writeInt(batch.rows.size());
                for (WindowRow w : batch.rows) {
                    out.writeUTF(w.tenantId);
                    out.writeUTF(w.customerId);
                    out.writeUTF(w.meter);
                    out.writeUTF(w.dimensionsKey);
                    out.writeLong(w.windowStartMs);
                    out.writeLong(w.windowEndMs);
                    out.writeUTF(w.quantity);
                    out.writeLong(w.eventCount);
                    out.writeLong(w.revision);
                    out.writeBoolean(w.isFinal);
                }
            }
            return bytes.toByteArray();
        }

        @Override
        public Batch deserialize(int version, byte[] serialized) throws IOException {
            if (version != 1) {
                throw new IOException("unknown usage window batch version " + version);
            }
            try (DataInputStream in = new DataInputStream(new ByteArrayInputStream(serialized))) {
                int n = in.readInt();
                List<WindowRow> rows = new ArrayList<>(n);
                for (int i = 0; i < n; i++) {
                    rows.add(new WindowRow(in.readUTF(), in.readUTF(), in.readUTF(), in.readUTF(), in.readLong(), in.readLong(), in.readUTF(), in.readLong(), in.readLong(), in.readBoolean()));
                }
                return new Batch(rows);
            }
        }
    }
}
