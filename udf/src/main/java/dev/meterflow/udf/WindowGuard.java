package dev.meterflow.udf;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.math.BigDecimal;
import java.time.Instant;
import java.util.LinkedHashMap;
import java.util.Map;

import org.apache.flink.api.common.functions.FilterFunction;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.avro.shaded.org.apache.avro.Conversions;
import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericData;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumWriter;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryEncoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.EncoderFactory;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.MapData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.BigIntType;
import org.apache.flink.table.types.logical.IntType;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.VarBinaryType;
import org.apache.flink.table.types.logical.VarCharType;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * Caps what one (tenant, customer, meter, window) can make the window aggregate hold: at most
 * {@code maxCombinations} distinct dimension keys (rows, closer state, closed-window records and
 * provider calls per window), and a sum of |quantity| of at most {@link #MAX_WINDOW_ABS_SUM}, the
 * largest decimal(38, 9), so the window's SUM can never overflow (Flink would return NULL and the NOT
 * NULL column would restart the job forever). The sum is over all the window's dimension keys, so it
 * bounds every row's; it is kept for every meter, whatever its aggregation (only SUM can overflow, and
 * no other meter gets near the limit: an event's |quantity| is at most 10^15 by the input contract).
 *
 * <p>Input: the classifier's rows (the routed columns, then its decision); {@link #apply} keeps the
 * counted on-time ones and keys them by window. An event is refused when its dimension key is new
 * and the window already has {@code maxCombinations}, or when it would take the sum of |quantity|
 * past the limit; a refused event adds nothing to the state. Admitted rows go on unchanged, with
 * their timestamp; watermarks pass through. A refused row leaves on {@link #deadLetters()} as a dead
 * letter: the event re-encoded as plain Avro of avro/usage_event.avsc, so it can be replayed once the
 * limit is raised. Its Kafka coordinates are the usage-events topic, partition -1 and offset -1:
 * counted rows do not carry their coordinates past the dedup (see jobs/plan.py routed_query).
 *
 * <p>State per key, cleared by an event-time timer at the window's close ({@link WindowClose}): one
 * value (sum, number of combinations, the first dimension key) read and written per event, and a map
 * of the further dimension keys, read only for an event whose key is not the first. Most windows
 * have one dimension key (every meter without group_by), so they never touch the map. The decisions
 * depend only on the state and the input order per key: a restore from a checkpoint decides alike.
 * A row can only reach the guard after its window's close when its input was idle while others moved
 * the watermark on (see {@link WindowCloser}); it is judged against a fresh state, which the next
 * watermark clears, and the window aggregate downstream treats it as it would without the guard.
 */
public class WindowGuard extends KeyedProcessFunction<String, RowData, RowData> {
    private static final long serialVersionUID = 1L;

    /** The largest decimal(38, 9): 10^29 - 10^-9. */
    public static final BigDecimal MAX_WINDOW_ABS_SUM = new BigDecimal("99999999999999999999999999999.999999999");
    public static final int PRECISION = 38;
    public static final int SCALE = 9;
    /** Kafka partition and offset of a dead letter the guard writes (the event went through the dedup). */
    public static final int NO_PARTITION = -1;
    public static final long NO_OFFSET = -1;

    /** The side output's columns: what the dead-letter insert reads (jobs/plan.py dead_letter_insert). */
    public static final RowType DEAD_LETTER_TYPE = RowType.of(
            new org.apache.flink.table.types.logical.LogicalType[] {
                new VarBinaryType(false, VarBinaryType.MAX_LENGTH),
                new VarCharType(false, VarCharType.MAX_LENGTH),
                new VarCharType(false, VarCharType.MAX_LENGTH),
                new IntType(false),
                new BigIntType(false)
            },
            new String[] {"payload", "reject_reason", "source_topic", "source_partition", "source_offset"});

    private static final Conversions.DecimalConversion DECIMALS = new Conversions.DecimalConversion();
    private static final OutputTag<RowData> DEAD_LETTERS = new OutputTag<>("guard-dead-letters", InternalTypeInfo.of(DEAD_LETTER_TYPE));

    // Positions of what the guard reads in a classified row, by column name.
    private final int eventIdField;
    private final int tenantField;
    private final int customerField;
    private final int meterField;
    private final int quantityField;
    private final int eventTimeField;
    private final int dimensionsField;
    private final int dimensionsKeyField;
    private final int windowStartField;
    private final int windowEndField;
    private final int rejectField;
    private final int isLateField;

    private final int maxCombinations;
    private final BigDecimal maxAbsSum;
    private final long allowedLatenessMs;
    private final String sourceTopic;

    /** (sum of |quantity| admitted, number of dimension keys admitted, the first of them). */
    private transient ValueState<Tuple3<BigDecimal, Integer, String>> window;
    /** The admitted dimension keys after the first. */
    private transient MapState<String, Boolean> moreKeys;
    private transient Schema eventSchema;
    private transient GenericDatumWriter<GenericRecord> writer;
    private transient ByteArrayOutputStream bytes;
    private transient BinaryEncoder encoder;

    /**
     * @param classifiedType the classifier's output row type (jobs/plan.py CLASSIFIED_COLUMNS)
     * @param maxCombinations input.max_dimension_combinations
     * @param allowedLatenessMs the window aggregate's allowed lateness: the state lives until the window closes
     * @param sourceTopic the usage-events topic, named in the dead letters
     */
    public WindowGuard(RowType classifiedType, int maxCombinations, long allowedLatenessMs, String sourceTopic) {
        this(classifiedType, maxCombinations, allowedLatenessMs, sourceTopic, MAX_WINDOW_ABS_SUM);
    }

    /** With another sum limit, for tests at the boundary without 10^14 events. */
    WindowGuard(RowType classifiedType, int maxCombinations, long allowedLatenessMs, String sourceTopic, BigDecimal maxAbsSum) {
        if (maxCombinations < 1) {
            throw new IllegalArgumentException("max_dimension_combinations must be at least 1, got " + maxCombinations);
        }
        eventIdField = field(classifiedType, "event_id");
        tenantField = field(classifiedType, "tenant_id");
        customerField = field(classifiedType, "customer_id");
        meterField = field(classifiedType, "meter");
        quantityField = field(classifiedType, "quantity");
        eventTimeField = field(classifiedType, "event_time");
        dimensionsField = field(classifiedType, "dimensions");
        dimensionsKeyField = field(classifiedType, "dimensions_key");
        windowStartField = field(classifiedType, "window_start");
        windowEndField = field(classifiedType, "window_end");
        rejectField = field(classifiedType, "reject_reason");
        isLateField = field(classifiedType, "is_late");
        this.maxCombinations = maxCombinations;
        this.maxAbsSum = maxAbsSum;
        this.allowedLatenessMs = allowedLatenessMs;
        this.sourceTopic = sourceTopic;
    }

    private static int field(RowType type, String name) {
        int index = type.getFieldIndex(name);
        if (index < 0) {
            throw new IllegalArgumentException("the window guard reads column " + name + ", not in " + type);
        }
        return index;
    }

    /**
     * The guard after the classifier: its counted on-time rows (a filter chained to the classifier),
     * keyed by window, through the guard. The result is the admitted rows, of the input's type; the
     * refused ones are its side output {@link #deadLetters()}.
     */
    public static SingleOutputStreamOperator<RowData> apply(DataStream<RowData> classified, WindowGuard guard, String name, String uid) {
        TypeInformation<RowData> type = classified.getType();
        return classified.filter(guard.countedOnTime()).name("counted on-time events").uid(uid + "-input")
                .keyBy(guard.windowKey(), Types.STRING)
                .process(guard, type).name(name).uid(uid);
    }

    /** The refused events, as dead-letter rows of {@link #DEAD_LETTER_TYPE}. */
    public static OutputTag<RowData> deadLetters() {
        return DEAD_LETTERS;
    }

    @Override
    public void open(OpenContext openContext) {
        TypeInformation<Tuple3<BigDecimal, Integer, String>> summary = Types.TUPLE(Types.BIG_DEC, Types.INT, Types.STRING);
        window = getRuntimeContext().getState(new ValueStateDescriptor<>("guard-window", summary));
        moreKeys = getRuntimeContext().getMapState(new MapStateDescriptor<>("guard-more-dimension-keys", Types.STRING, Types.BOOLEAN));
        eventSchema = usageEventSchema();
        writer = new GenericDatumWriter<>(eventSchema);
        bytes = new ByteArrayOutputStream(256);
    }

    @Override
    public void processElement(RowData row, Context ctx, Collector<RowData> out) throws Exception {
        String key = row.getString(dimensionsKeyField).toString();
        BigDecimal quantity = row.getDecimal(quantityField, PRECISION, SCALE).toBigDecimal().abs();
        Tuple3<BigDecimal, Integer, String> held = window.value();
        BigDecimal sum = held == null ? quantity : held.f0.add(quantity);
        boolean newKey = held != null && !key.equals(held.f2) && !moreKeys.contains(key);
        if (newKey && held.f1 >= maxCombinations) {
            refuse(row, "dimension combinations: window " + windowOf(row) + " already has " + held.f1 + " combinations (input.max_dimension_combinations)", ctx);
            return;
        }
        if (sum.compareTo(maxAbsSum) > 0) {
            refuse(row, "window quantity overflow: window " + windowOf(row) + ": sum of |quantity| would pass " + maxAbsSum.toPlainString() + " (decimal(38, 9))", ctx);
            return;
        }
        if (held == null) {
            window.update(Tuple3.of(sum, 1, key));
            ctx.timerService().registerEventTimeTimer(WindowClose.closeTime(row.getTimestamp(windowEndField, 3).getMillisecond(), allowedLatenessMs));
        } else if (newKey) {
            moreKeys.put(key, true);
            window.update(Tuple3.of(sum, held.f1 + 1, held.f2));
        } else if (quantity.signum() != 0) {
            window.update(Tuple3.of(sum, held.f1, held.f2));
        }
        out.collect(row);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<RowData> out) {
        // The window closed downstream at this watermark: no on-time event of it can come any more.
        window.clear();
        moreKeys.clear();
    }

    /** "<window start ISO> of tenant/customer/meter": ids are at most 64-128 bytes by the input contract. */
    private String windowOf(RowData row) {
        Instant start = Instant.ofEpochMilli(row.getTimestamp(windowStartField, 3).getMillisecond());
        return start + " of " + row.getString(tenantField) + "/" + row.getString(customerField) + "/" + row.getString(meterField);
    }

    private void refuse(RowData row, String reason, Context ctx) {
        ctx.output(DEAD_LETTERS, GenericRowData.of(encode(row), StringData.fromString(reason), StringData.fromString(sourceTopic), NO_PARTITION, NO_OFFSET));
    }

    /** The event as plain Avro of avro/usage_event.avsc, as a producer sends it (the event time is the one sent: counted events are within bounds). */
    byte[] encode(RowData row) {
        GenericRecord event = new GenericData.Record(eventSchema);
        event.put("event_id", row.getString(eventIdField).toString());
        event.put("tenant_id", row.getString(tenantField).toString());
        event.put("customer_id", row.getString(customerField).toString());
        event.put("meter", row.getString(meterField).toString());
        Schema quantitySchema = eventSchema.getField("quantity").schema();
        BigDecimal quantity = row.getDecimal(quantityField, PRECISION, SCALE).toBigDecimal().setScale(SCALE);
        event.put("quantity", DECIMALS.toBytes(quantity, quantitySchema, quantitySchema.getLogicalType()));
        event.put("event_time", row.getTimestamp(eventTimeField, 3).getMillisecond());
        Map<String, String> dimensions = new LinkedHashMap<>();
        if (!row.isNullAt(dimensionsField)) {
            MapData map = row.getMap(dimensionsField);
            for (int i = 0; i < map.size(); i++) {
                dimensions.put(map.keyArray().getString(i).toString(), map.valueArray().getString(i).toString());
            }
        }
        event.put("dimensions", dimensions);
        bytes.reset();
        encoder = EncoderFactory.get().binaryEncoder(bytes, encoder);
        try {
            writer.write(event, encoder);
            encoder.flush();
        } catch (IOException e) {
            throw new UncheckedIOException(e); // into memory: only a bug gets here
        }
        return bytes.toByteArray();
    }

    /** avro/usage_event.avsc as bundled in this jar: the .avsc stays the single source of truth. */
    static Schema usageEventSchema() {
        try (InputStream in = WindowGuard.class.getResourceAsStream("/avro/usage_event.avsc")) {
            if (in == null) {
                throw new IllegalStateException("avro/usage_event.avsc is not in the udf jar");
            }
            return new Schema.Parser().parse(in);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    /** The rows the guard judges: counted (no reject reason) and on time. */
    static final class CountedOnTime implements FilterFunction<RowData> {
        private static final long serialVersionUID = 1L;
        private final int rejectField;
        private final int isLateField;

        CountedOnTime(int rejectField, int isLateField) {
            this.rejectField = rejectField;
            this.isLateField = isLateField;
        }

        @Override
        public boolean filter(RowData row) {
            return row.isNullAt(rejectField) && !row.isNullAt(isLateField) && !row.getBoolean(isLateField);
        }
    }

    /** (tenant, customer, meter, window start ms), joined with a separator no id contains (the input contract bars control characters). */
    static final class WindowKey implements KeySelector<RowData, String> {
        private static final long serialVersionUID = 1L;
        private final int tenantField;
        private final int customerField;
        private final int meterField;
        private final int windowStartField;

        WindowKey(int tenantField, int customerField, int meterField, int windowStartField) {
            this.tenantField = tenantField;
            this.customerField = customerField;
            this.meterField = meterField;
            this.windowStartField = windowStartField;
        }

        @Override
        public String getKey(RowData row) {
            return row.getString(tenantField) + "\u0000" + row.getString(customerField) + "\u0000" + row.getString(meterField)
                    + "\u0000" + row.getTimestamp(windowStartField, 3).getMillisecond();
        }
    }

    /** The key the guard's input is partitioned by. */
    KeySelector<RowData, String> windowKey() {
        return new WindowKey(tenantField, customerField, meterField, windowStartField);
    }

    /** The filter in front of the guard. */
    FilterFunction<RowData> countedOnTime() {
        return new CountedOnTime(rejectField, isLateField);
    }
}
