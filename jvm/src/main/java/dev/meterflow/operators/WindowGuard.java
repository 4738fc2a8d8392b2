package dev.meterflow.operators;

import java.math.BigDecimal;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.runtime.state.StateSnapshotContext;
import org.apache.flink.runtime.state.VoidNamespace;
import org.apache.flink.runtime.state.VoidNamespaceSerializer;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.InternalTimer;
import org.apache.flink.streaming.api.operators.InternalTimerService;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.api.operators.Triggerable;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.table.data.ArrayData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.MapData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.types.logical.RowType;

/**
 * Caps what one (tenant, customer, meter, window) can make the job hold: at most {@code
 * maxCombinations} distinct dimension keys (rows, closer state, closed-window records and provider
 * calls per window), and a sum of |quantity| of at most {@link #MAX_WINDOW_ABS_SUM}, the largest
 * decimal(38, 9), so the window's SUM can never overflow (Flink would return NULL and the NOT NULL
 * column would restart the job forever). The sum is over all the window's dimension keys, so it
 * bounds every row's; it is kept for every meter, whatever its aggregation (an event's |quantity| is
 * at most 10^15 by the input contract, so only a window of 10^14 such events gets near it). For a
 * UNIQUE_COUNT meter it also caps the distinct values of the meter's unique dimension at {@code
 * maxUniqueValues} per window, which bound the distinct sets the window aggregate holds (the SQL
 * graph's COUNT(DISTINCT) state, the two-stage graph's partials in memory and merged state).
 *
 * <p>It runs on the validated records, before the dedup: a refused event takes no dedup state, so
 * once the limit is raised, replaying its dead letter counts it. Input: the validated view's columns
 * (jobs/plan.py GUARD_INPUT_COLUMNS), rejected records included. A record already rejected passes
 * untouched, keyed by its Kafka coordinates. An event is refused when its dimension key is new and
 * its window already has {@code maxCombinations}, or when it would take the sum of |quantity| past
 * the limit; a refused event adds nothing to the state and leaves as the same record with its
 * {@code reject_reason} set, so it takes the rejected records' path to the dead-letter topic with its
 * raw bytes and Kafka coordinates. Everything else passes unchanged, with its timestamp; watermarks
 * pass through.
 *
 * <p>Copies of one event all count towards the state (the dedup comes after): a copy of an admitted
 * event has its dimension key, so it is admitted and then dropped by the dedup; its quantity adds to
 * the sum, which keeps the cap conservative. Late events count towards their window's state until
 * it closes; after that a fresh state, cleared at the next watermark, judges them.
 *
 * <p>State per key, cleared by an event-time timer at the window's close ({@link WindowClose}): one
 * value (sum, number of combinations, the first dimension key), a map of the further dimension keys,
 * and for a UNIQUE_COUNT meter the distinct values and their number. A window's value is read into
 * memory at its first event after a write-back and decided on there; a dimension key or distinct
 * value not yet held is looked up in its map once; a new window writes its end and registers its
 * close timer at once. Everything else is written back, only what changed, when the next
 * checkpoint snapshots the operator ({@code snapshotState}, before the keyed state), or before an
 * event once {@link #MAX_WINDOWS_IN_MEMORY} windows or {@link #MAX_KEYS_IN_MEMORY} dimension keys
 * and values are held. So a checkpoint holds exactly what a guard deciding from its state per event
 * would hold, and the decisions depend only on the state and the input order per key: a restore
 * decides alike.
 */
public class WindowGuard extends AbstractStreamOperator<RowData> implements OneInputStreamOperator<RowData, RowData>, Triggerable<String, VoidNamespace> {
    private static final long serialVersionUID = 1L;

    /** The largest decimal(38, 9): 10^29 - 10^-9. */
    public static final BigDecimal MAX_WINDOW_ABS_SUM = new BigDecimal("99999999999999999999999999999.999999999");
    public static final int PRECISION = 38;
    public static final int SCALE = 9;
    /** Windows held in memory at most before all are written back to state: about 300 B each, with their keys and values apart. */
    public static final int MAX_WINDOWS_IN_MEMORY = 100_000;
    /** Dimension keys and distinct values held in memory, over all windows, before all are written back: at most about 500 B each. */
    public static final int MAX_KEYS_IN_MEMORY = 200_000;

    private final RowType inputType;
    private final int tenantField;
    private final int customerField;
    private final int meterField;
    private final int quantityField;
    private final int eventTimeField;
    private final int dimensionsKeyField;
    private final int dimensionsField;
    private final int rejectField;
    private final int topicField;
    private final int partitionField;
    private final int offsetField;

    private final int maxCombinations;
    private final BigDecimal maxAbsSum;
    private final long windowSizeMs;
    private final long allowedLatenessMs;
    /** Each UNIQUE_COUNT meter's unique dimension. */
    private final HashMap<String, String> uniqueDimensions;
    private final int maxUniqueValues;

    /** (sum of |quantity| admitted, number of dimension keys admitted, the first of them). */
    private transient ValueState<Tuple3<BigDecimal, Integer, String>> window;
    /** The admitted dimension keys after the first. */
    private transient MapState<String, Boolean> moreKeys;
    private transient ValueState<Long> windowEnd;
    /** A UNIQUE_COUNT window's distinct values admitted, and their number (state of its own, so older savepoints restore). */
    private transient MapState<String, Boolean> uniqueValues;
    private transient ValueState<Integer> uniqueCount;
    private transient InternalTimerService<VoidNamespace> timers;
    private transient RowData.FieldGetter[] getters;
    /** The windows read since the last write-back, by key. */
    private transient HashMap<String, HeldWindow> held;
    /** The dimension keys and distinct values the held windows keep, looked up or added. */
    private transient int heldKeys;

    /**
     * @param inputType the validated rows' type (jobs/plan.py GUARD_INPUT_COLUMNS)
     * @param maxCombinations input.max_dimension_combinations
     * @param windowSizeMs event_time.window_size
     * @param allowedLatenessMs the window aggregate's allowed lateness: the state lives until the window closes
     */
    public WindowGuard(RowType inputType, int maxCombinations, long windowSizeMs, long allowedLatenessMs) {
        this(inputType, maxCombinations, windowSizeMs, allowedLatenessMs, Map.of(), Integer.MAX_VALUE);
    }

    /**
     * @param uniqueDimensions each UNIQUE_COUNT meter's unique dimension (meter name to dimension name)
     * @param maxUniqueValues input.max_unique_values
     */
    public WindowGuard(
            RowType inputType, int maxCombinations, long windowSizeMs, long allowedLatenessMs, Map<String, String> uniqueDimensions, int maxUniqueValues) {
        this(inputType, maxCombinations, windowSizeMs, allowedLatenessMs, MAX_WINDOW_ABS_SUM, uniqueDimensions, maxUniqueValues);
    }

    /** With another sum limit, for tests at the boundary without 10^14 events. */
    WindowGuard(RowType inputType, int maxCombinations, long windowSizeMs, long allowedLatenessMs, BigDecimal maxAbsSum) {
        this(inputType, maxCombinations, windowSizeMs, allowedLatenessMs, maxAbsSum, Map.of(), Integer.MAX_VALUE);
    }

    private WindowGuard(
            RowType inputType,
            int maxCombinations,
            long windowSizeMs,
            long allowedLatenessMs,
            BigDecimal maxAbsSum,
            Map<String, String> uniqueDimensions,
            int maxUniqueValues) {
        if (maxCombinations < 1) {
            throw new IllegalArgumentException("max_dimension_combinations must be at least 1, got " + maxCombinations);
        }
        if (maxUniqueValues < 1) {
            throw new IllegalArgumentException("max_unique_values must be at least 1, got " + maxUniqueValues);
        }
        if (windowSizeMs < 1) {
            throw new IllegalArgumentException("window size must be positive, got " + windowSizeMs + " ms");
        }
        this.inputType = inputType;
        tenantField = field(inputType, "tenant_id");
        customerField = field(inputType, "customer_id");
        meterField = field(inputType, "meter");
        quantityField = field(inputType, "quantity");
        eventTimeField = field(inputType, "event_time");
        dimensionsKeyField = field(inputType, "dimensions_key");
        dimensionsField = field(inputType, "dimensions");
        rejectField = field(inputType, "reject_reason");
        topicField = field(inputType, "source_topic");
        partitionField = field(inputType, "source_partition");
        offsetField = field(inputType, "source_offset");
        this.maxCombinations = maxCombinations;
        this.maxAbsSum = maxAbsSum;
        this.windowSizeMs = windowSizeMs;
        this.allowedLatenessMs = allowedLatenessMs;
        this.uniqueDimensions = new HashMap<>(uniqueDimensions);
        this.maxUniqueValues = maxUniqueValues;
    }

    private static int field(RowType type, String name) {
        int index = type.getFieldIndex(name);
        if (index < 0) {
            throw new IllegalArgumentException("the window guard reads column " + name + ", not in " + type);
        }
        return index;
    }

    /** The validated rows keyed by window (rejects by their coordinates) through the guard: rows of the input's type. */
    public static SingleOutputStreamOperator<RowData> apply(DataStream<RowData> validated, WindowGuard guard, String name, String uid) {
        TypeInformation<RowData> type = validated.getType();
        return validated.keyBy(guard.windowKey(), Types.STRING).transform(name, type, guard).uid(uid);
    }

    @Override
    public void open() throws Exception {
        super.open();
        TypeInformation<Tuple3<BigDecimal, Integer, String>> summary = Types.TUPLE(Types.BIG_DEC, Types.INT, Types.STRING);
        // The names a KeyedProcessFunction gave them (state and timers), so earlier savepoints restore.
        window = state(new ValueStateDescriptor<>("guard-window", summary));
        moreKeys = getPartitionedState(VoidNamespace.INSTANCE, VoidNamespaceSerializer.INSTANCE,
            new MapStateDescriptor<>("guard-more-dimension-keys", Types.STRING, Types.BOOLEAN));
        // The window's end, so a timer restored from a savepoint taken under a lower allowed lateness
        // can move to the close time under the current one (a savepoint without it restores none).
        windowEnd = state(new ValueStateDescriptor<>("guard-window-end", Types.LONG));
        uniqueValues = getPartitionedState(VoidNamespace.INSTANCE, VoidNamespaceSerializer.INSTANCE,
            new MapStateDescriptor<>("guard-unique-values", Types.STRING, Types.BOOLEAN));
        uniqueCount = state(new ValueStateDescriptor<>("guard-unique-count", Types.INT));
        timers = getInternalTimerService("user-timers", VoidNamespaceSerializer.INSTANCE, this);
        getters = new RowData.FieldGetter[inputType.getFieldCount()];
        for (int i = 0; i < getters.length; i++) {
            getters[i] = RowData.createFieldGetter(inputType.getTypeAt(i), i);
        }
        held = new HashMap<>();
        heldKeys = 0;
    }

    private <T> ValueState<T> state(ValueStateDescriptor<T> descriptor) throws Exception {
        return getPartitionedState(VoidNamespace.INSTANCE, VoidNamespaceSerializer.INSTANCE, descriptor);
    }

    @Override
    public void processElement(StreamRecord<RowData> element) throws Exception {
        RowData row = element.getValue();
        if (!row.isNullAt(rejectField)) {
            output.collect(element);
            return;
        }
        String windowKey = (String) getCurrentKey();
        if (held.size() >= MAX_WINDOWS_IN_MEMORY || heldKeys >= MAX_KEYS_IN_MEMORY) {
            writeBack();
            setCurrentKey(windowKey); // the write-back visits the held windows' keys
        }
        HeldWindow w = held.get(windowKey);
        if (w == null) {
            w = read();
            held.put(windowKey, w);
        }
        String key = row.getString(dimensionsKeyField).toString();
        BigDecimal quantity = row.getDecimal(quantityField, PRECISION, SCALE).toBigDecimal().abs();
        BigDecimal sum = w.sum == null ? quantity : w.sum.add(quantity);
        boolean newKey = w.sum != null && !key.equals(w.firstKey) && !w.keys.has(key, moreKeys);
        if (newKey && w.combinations >= maxCombinations) {
            output.collect(element.replace(refused(row, "dimension combinations: window " + windowOf(row) + " already has " + w.combinations + " combinations (input.max_dimension_combinations)")));
            return;
        }
        if (sum.compareTo(maxAbsSum) > 0) {
            output.collect(element.replace(refused(row, "window quantity overflow: window " + windowOf(row) + ": sum of |quantity| would pass " + maxAbsSum.toPlainString() + " (decimal(38, 9))")));
            return;
        }
        // Most deployments have no UNIQUE_COUNT meter: no meter name is decoded for them.
        String uniqueDimension = uniqueDimensions.isEmpty() ? null : uniqueDimensions.get(row.getString(meterField).toString());
        String uniqueValue = uniqueDimension == null ? null : valueOf(row.isNullAt(dimensionsField) ? null : row.getMap(dimensionsField), uniqueDimension);
        boolean newValue = uniqueValue != null && !w.values.has(uniqueValue, uniqueValues);
        if (newValue && w.uniqueCount(uniqueCount) >= maxUniqueValues) {
            output.collect(element.replace(refused(row, "unique values: window " + windowOf(row) + " already has " + w.uniqueCount + " distinct values of " + uniqueDimension + " (input.max_unique_values)")));
            return;
        }
        if (w.sum == null) {
            long end = windowStart(row) + windowSizeMs;
            w.firstKey = key;
            w.combinations = 1;
            w.changed = true;
            // Once per window: the end and the close timer go to state at once.
            windowEnd.update(end);
            timers.registerEventTimeTimer(VoidNamespace.INSTANCE, WindowClose.closeTime(end, allowedLatenessMs));
        } else if (newKey) {
            w.keys.add(key);
            w.combinations++;
        }
        if (quantity.signum() != 0) {
            w.changed = true;
        }
        w.sum = sum;
        if (newValue) {
            w.values.add(uniqueValue);
            w.uniqueCount++;
        }
        output.collect(element);
    }

    /** The current key's window as its state has it. */
    private HeldWindow read() throws Exception {
        HeldWindow w = new HeldWindow();
        Tuple3<BigDecimal, Integer, String> stored = window.value();
        if (stored != null) {
            w.sum = stored.f0;
            w.combinations = stored.f1;
            w.firstKey = stored.f2;
        }
        return w;
    }

    /** Every window held in memory written to its state, only what changed, then forgotten here. */
    private void writeBack() throws Exception {
        for (Map.Entry<String, HeldWindow> entry : held.entrySet()) {
            HeldWindow w = entry.getValue();
            if (!w.changed && !w.keys.changed() && !w.values.changed()) {
                continue;
            }
            setCurrentKey(entry.getKey());
            if (w.changed || w.keys.changed()) {
                window.update(Tuple3.of(w.sum, w.combinations, w.firstKey));
            }
            w.keys.writeTo(moreKeys);
            if (w.values.changed()) {
                w.values.writeTo(uniqueValues);
                uniqueCount.update(w.uniqueCount);
            }
        }
        held.clear();
        heldKeys = 0;
    }

    /** Before the keyed state is snapshotted (nothing is emitted, so it need not precede the barrier). */
    @Override
    public void snapshotState(StateSnapshotContext context) throws Exception {
        writeBack();
        super.snapshotState(context);
    }

    @Override
    public void finish() throws Exception {
        writeBack();
        super.finish();
    }

    @Override
    public void onEventTime(InternalTimer<String, VoidNamespace> timer) throws Exception {
        Long end = windowEnd.value();
        if (end != null && timer.getTimestamp() < WindowClose.closeTime(end, allowedLatenessMs)) {
            // Registered under a lower allowed lateness before a restore: the window is still open.
            timers.registerEventTimeTimer(VoidNamespace.INSTANCE, WindowClose.closeTime(end, allowedLatenessMs));
            return;
        }
        // The window closed downstream at this watermark: no on-time event of it can come any more.
        held.remove(timer.getKey());
        window.clear();
        moreKeys.clear();
        windowEnd.clear();
        uniqueValues.clear();
        uniqueCount.clear();
    }

    @Override
    public void onProcessingTime(InternalTimer<String, VoidNamespace> timer) {
        // No processing-time timers.
    }

    /**
     * A window's state in memory between write-backs: what its state had, what the decisions since
     * added, and of the keyed maps only the entries looked up or added (each read from state once).
     */
    private final class HeldWindow {
        BigDecimal sum;
        int combinations;
        String firstKey;
        boolean changed;
        final HeldEntries keys = new HeldEntries();
        final HeldEntries values = new HeldEntries();
        private Integer uniqueCount;

        int uniqueCount(ValueState<Integer> stored) throws Exception {
            if (uniqueCount == null) {
                Integer count = stored.value();
                uniqueCount = count == null ? 0 : count;
            }
            return uniqueCount;
        }
    }

    /** The entries of one of a window's map states held in memory: those known to be there, and those added since the write-back. */
    private final class HeldEntries {
        private Set<String> known;
        private List<String> added;

        boolean has(String entry, MapState<String, Boolean> stored) throws Exception {
            if (known != null && known.contains(entry)) {
                return true;
            }
            if (stored.contains(entry)) {
                hold(entry);
                return true;
            }
            return false;
        }

        void add(String entry) {
            hold(entry);
            added = added == null ? new ArrayList<>() : added;
            added.add(entry);
        }

        boolean changed() {
            return added != null;
        }

        void writeTo(MapState<String, Boolean> stored) throws Exception {
            if (added != null) {
                for (String entry : added) {
                    stored.put(entry, Boolean.TRUE);
                }
            }
        }

        private void hold(String entry) {
            known = known == null ? new HashSet<>() : known;
            known.add(entry);
            heldKeys++;
        }
    }

    /** The value of dimension {@code name}, or null (at most 16 entries by the input contract). */
    private static String valueOf(MapData dimensions, String name) {
        if (dimensions == null) {
            return null;
        }
        ArrayData keys = dimensions.keyArray();
        ArrayData values = dimensions.valueArray();
        for (int i = 0; i < dimensions.size(); i++) {
            if (!keys.isNullAt(i) && name.equals(keys.getString(i).toString())) {
                return values.isNullAt(i) ? null : values.getString(i).toString();
            }
        }
        return null;
    }

    private long windowStart(RowData row) {
        long eventMs = row.getTimestamp(eventTimeField, 3).getMillisecond();
        return eventMs - Math.floorMod(eventMs, windowSizeMs);
    }

    /** "<window start ISO> of tenant/customer/meter": ids are at most 64-128 bytes by the input contract. */
    private String windowOf(RowData row) {
        return Instant.ofEpochMilli(windowStart(row)) + " of " + row.getString(tenantField) + "/" + row.getString(customerField) + "/" + row.getString(meterField);
    }

    /** A copy of the record with its reason set (the input row may be reused by the caller: object reuse is on). */
    private RowData refused(RowData row, String reason) {
        GenericRowData copy = new GenericRowData(row.getRowKind(), getters.length);
        for (int i = 0; i < getters.length; i++) {
            copy.setField(i, getters[i].getFieldOrNull(row));
        }
        copy.setField(rejectField, StringData.fromString(reason));
        return copy;
    }

    /**
     * (tenant, customer, meter, window start ms) of an event, joined with a separator no id contains
     * (the input contract bars control characters); a rejected record's Kafka coordinates, which
     * spread rejects over the subtasks.
     */
    static final class WindowKey implements KeySelector<RowData, String> {
        private static final long serialVersionUID = 1L;
        private final WindowGuard guard;

        WindowKey(WindowGuard guard) {
            this.guard = guard;
        }

        @Override
        public String getKey(RowData row) {
            if (!row.isNullAt(guard.rejectField)) {
                return "\u0001" + row.getString(guard.topicField) + "\u0000" + row.getInt(guard.partitionField) + "\u0000" + row.getLong(guard.offsetField);
            }
            return row.getString(guard.tenantField) + "\u0000" + row.getString(guard.customerField) + "\u0000" + row.getString(guard.meterField)
                    + "\u0000" + guard.windowStart(row);
        }
    }

    /** The key the guard's input is partitioned by. */
    KeySelector<RowData, String> windowKey() {
        return new WindowKey(this);
    }
}
