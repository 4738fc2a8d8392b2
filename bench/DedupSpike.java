import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.Collection;
import java.util.Locale;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.serialization.DeserializationSchema;
import org.apache.flink.api.common.state.StateTtlConfig;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.connector.kafka.source.reader.deserializer.KafkaRecordDeserializationSchema;
import org.apache.flink.kafka.shaded.org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.flink.shaded.guava33.com.google.common.hash.BloomFilter;
import org.apache.flink.shaded.guava33.com.google.common.hash.Funnels;
import org.apache.flink.shaded.guava33.com.google.common.hash.HashFunction;
import org.apache.flink.shaded.guava33.com.google.common.hash.Hashing;
import org.apache.flink.state.rocksdb.RocksDBOptionsFactory;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.util.Collector;
import org.rocksdb.ColumnFamilyOptions;
import org.rocksdb.DBOptions;

import dev.meterflow.format.UsageEventDecoder;
import dev.meterflow.stages.DedupAndPartials;
import dev.meterflow.stages.MeteredEvent;
import dev.meterflow.stages.PartialWindow;
import dev.meterflow.stages.WindowKey;
import dev.meterflow.stages.WindowMerger;

/**
 * The throughput gate: Kafka -> the meterflow-avro decoder with its validation -> bounded event
 * time and watermarks -> one keyed exchange on a 128-bit hash of (tenant_id, event_id) -> dedup in
 * keyed state with the horizon as processing-time TTL -> discard. The per-event part of a keyed JVM
 * stage, without its window partials or sinks.
 *
 * <p>One JVM runs the whole job (Flink's local mini cluster: JobManager and one TaskManager slot),
 * at parallelism 1, exactly-once checkpoints every 5 s, object reuse, the shipped state backend
 * options. Steady state is the second half of the input: the process's CPU time and the wall clock
 * between the dedup's N/2-th and N-th event (JIT warm-up and job start are in the first half).
 *
 * <p>Modes: {@code dedup} (the gate), {@code exchange} (the same without the state access: what the
 * source, decode and exchange cost alone), {@code dedup+heap-bloom} (a heap Bloom filter first).
 * Backends: {@code hashmap}, {@code rocksdb} (the shipped options), and {@code rocksdb} with
 * {@code +memtable-bloom} and/or {@code +uncompressed-l0-l1}.
 *
 * <p>Args: bootstrap topic records mode backend checkpointDir
 */
public class DedupSpike {

    static final HashFunction MURMUR = Hashing.murmur3_128();
    static final long SKEW_MS = Duration.ofMinutes(10).toMillis();
    static final AtomicLong SEEN = new AtomicLong();
    static final AtomicLong KEPT = new AtomicLong();
    static final AtomicLong REJECTED = new AtomicLong();
    static volatile long total;
    static final long[] WALL_NS = new long[3];
    static final long[] CPU_NS = new long[3];
    static final long[] EPOCH_MS = new long[3];

    /** The per-event fields a keyed stage carries: the compact id hash, bounded event time, quantity. */
    public static class Event {
        public long idHigh;
        public long idLow;
        public long eventTimeMs;
        public long quantityUnscaled;
        public int customerHash;

        public Event() {}
    }

    static long processCpuNs() {
        return ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean()).getProcessCpuTime();
    }

    static void mark(long n) {
        int at = n == 1 ? 0 : n == total / 2 ? 1 : n == total ? 2 : -1;
        if (at >= 0) {
            WALL_NS[at] = System.nanoTime();
            CPU_NS[at] = processCpuNs();
            EPOCH_MS[at] = System.currentTimeMillis();
        }
    }

    /** Decode and validate with the format's own decoder; rejects are counted (the job sends them to its dead letters). */
    static final class Decode implements KafkaRecordDeserializationSchema<Event> {
        private transient UsageEventDecoder decoder;
        private transient GenericRowData row;
        private transient Event reused;

        @Override
        public void open(DeserializationSchema.InitializationContext context) {
            decoder = new UsageEventDecoder();
            row = new GenericRowData(UsageEventDecoder.ARITY);
            reused = new Event();
        }

        @Override
        public void deserialize(ConsumerRecord<byte[], byte[]> record, Collector<Event> out) {
            String reason = decoder.decodeInto(record.value(), row);
            if (reason != null) {
                REJECTED.incrementAndGet();
                return;
            }
            byte[] tenant = ((StringData) row.getField(1)).toBytes();
            byte[] eventId = ((StringData) row.getField(0)).toBytes();
            // Length-prefixed, so ("ab", "c") and ("a", "bc") never share a hash input.
            byte[] hash = MURMUR.newHasher().putInt(tenant.length).putBytes(tenant).putBytes(eventId).hash().asBytes();
            ByteBuffer b = ByteBuffer.wrap(hash);
            Event e = reused;
            e.idHigh = b.getLong();
            e.idLow = b.getLong();
            long eventTime = row.getTimestamp(5, 3).getMillisecond();
            // The bounded event time: never further ahead of the broker's clock than the skew limit.
            e.eventTimeMs = Math.min(eventTime, record.timestamp() + SKEW_MS);
            e.quantityUnscaled = row.getDecimal(4, 38, 9).toUnscaledLong();
            e.customerHash = row.getField(2).hashCode();
            out.collect(e);
        }

        @Override
        public TypeInformation<Event> getProducedType() {
            return TypeInformation.of(Event.class);
        }
    }

    /** Decode and validate as {@link Decode}, into the two stages' event (mode {@code stages}). */
    static final class DecodeMetered implements KafkaRecordDeserializationSchema<MeteredEvent> {
        private transient UsageEventDecoder decoder;
        private transient GenericRowData row;

        @Override
        public void open(DeserializationSchema.InitializationContext context) {
            decoder = new UsageEventDecoder();
            row = new GenericRowData(UsageEventDecoder.ARITY);
        }

        @Override
        public void deserialize(ConsumerRecord<byte[], byte[]> record, Collector<MeteredEvent> out) {
            String reason = decoder.decodeInto(record.value(), row);
            if (reason != null) {
                REJECTED.incrementAndGet();
                return;
            }
            long eventTime = Math.min(row.getTimestamp(5, 3).getMillisecond(), record.timestamp() + SKEW_MS);
            mark(SEEN.incrementAndGet());
            // No group-by dimensions in the data set's meters: every window's dimensions key is {}.
            out.collect(new MeteredEvent(row.getString(1).toString(), row.getString(2).toString(), row.getString(3).toString(), "{}",
                    row.getString(0).toString(), eventTime, row.getDecimal(4, 38, 9).toBigDecimal(), null));
        }

        @Override
        public TypeInformation<MeteredEvent> getProducedType() {
            return TypeInformation.of(MeteredEvent.class);
        }
    }

    /**
     * First copy of an id passes; later copies within the horizon are dropped. With {@code heapBloom}
     * a Bloom filter on the heap answers "never seen" before the state is read (the filter is not
     * checkpointed here: the variant measures what skipping the read saves, not a restore).
     */
    static final class Dedup extends KeyedProcessFunction<Tuple2<Long, Long>, Event, Event> {
        private final boolean withState;
        private final boolean heapBloom;
        private final long expectedIds;
        private transient ValueState<Boolean> seen;
        private transient BloomFilter<Long> maybeSeen;

        Dedup(boolean withState, boolean heapBloom, long expectedIds) {
            this.withState = withState;
            this.heapBloom = heapBloom;
            this.expectedIds = expectedIds;
        }

        @Override
        public void open(OpenContext context) {
            ValueStateDescriptor<Boolean> d = new ValueStateDescriptor<>("seen", Types.BOOLEAN);
            d.enableTimeToLive(StateTtlConfig.newBuilder(Duration.ofDays(7)).cleanupInRocksdbCompactFilter(1000).build());
            seen = getRuntimeContext().getState(d);
            if (heapBloom) {
                maybeSeen = BloomFilter.create(Funnels.longFunnel(), expectedIds, 0.01);
            }
        }

        @Override
        public void processElement(Event e, Context ctx, Collector<Event> out) throws Exception {
            mark(SEEN.incrementAndGet());
            if (withState) {
                // The high half of a 128-bit hash is itself a uniform 64-bit hash of the id.
                boolean known = heapBloom ? maybeSeen.mightContain(e.idHigh) && seen.value() != null : seen.value() != null;
                if (known) {
                    return;
                }
                seen.update(Boolean.TRUE);
                if (heapBloom) {
                    maybeSeen.put(e.idHigh);
                }
            }
            KEPT.incrementAndGet();
            out.collect(e);
        }
    }

    /**
     * A Bloom filter over each memtable's whole keys: nearly every dedup lookup is of a new id, which
     * otherwise walks the memtable's skip list (a million entries deep) before the SST files' filters.
     */
    public static final class MemtableBloom implements RocksDBOptionsFactory {
        private static final long serialVersionUID = 1L;

        @Override
        public DBOptions createDBOptions(DBOptions current, Collection<AutoCloseable> handlesToClose) {
            return current;
        }

        @Override
        public ColumnFamilyOptions createColumnOptions(ColumnFamilyOptions current, Collection<AutoCloseable> handlesToClose) {
            return current.setMemtableWholeKeyFiltering(true).setMemtablePrefixBloomSizeRatio(0.1);
        }
    }

    /**
     * Mode {@code stages}: both keyed stages of the planned job (jvm/ dev.meterflow.stages), with the
     * shipped one-minute windows, 10 s allowed lateness and 7-day dedup horizon, partials emitted at
     * barriers, fired watermarks and 100,000 open windows, and the second stage's rows discarded.
     */
    static void declareStages(StreamExecutionEnvironment env, String bootstrap, String topic) {
        KafkaSource<MeteredEvent> source = KafkaSource.<MeteredEvent>builder()
                .setBootstrapServers(bootstrap)
                .setTopics(topic)
                .setGroupId("two-stages")
                .setStartingOffsets(OffsetsInitializer.earliest())
                .setBounded(OffsetsInitializer.latest())
                .setDeserializer(new DecodeMetered())
                .build();
        WatermarkStrategy<MeteredEvent> watermarks = WatermarkStrategy.<MeteredEvent>forBoundedOutOfOrderness(Duration.ofSeconds(5))
                .withTimestampAssigner((e, ts) -> e.eventTimeMs);
        DataStream<MeteredEvent> events = env.fromSource(source, watermarks, "usage events").uid("source");
        var partials = events.keyBy(MeteredEvent.idKey(), Types.TUPLE(Types.LONG, Types.LONG))
                .transform("dedup, lateness, partials", DedupAndPartials.outputType(),
                        new DedupAndPartials(60_000, 10_000, Duration.ofDays(7), java.util.Map.of(), 100_000, 0))
                .uid("stage-1");
        partials.getSideOutput(DedupAndPartials.LATE).sinkTo(new DiscardingSink<>()).uid("discard-late");
        // The events the partials hold: what the dedup kept on time (per partial, not per event).
        var counted = partials.map(p -> {
            KEPT.addAndGet(p.partial.eventCount());
            return p;
        }, DedupAndPartials.outputType()).uid("count-kept");
        var finals = counted.keyBy(WindowKey.selector(), Types.STRING)
                .process(new WindowMerger(10_000, 5_000, 600_000), WindowMerger.outputType())
                .uid("stage-2");
        finals.sinkTo(new DiscardingSink<>()).uid("discard");
        finals.getSideOutput(WindowMerger.FIRES).sinkTo(new DiscardingSink<>()).uid("discard-fires");
    }

    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        total = Long.parseLong(args[2]);
        String mode = args[3];
        String backend = args[4];
        String checkpointDir = args[5];

        Configuration conf = new Configuration();
        conf.setString("execution.checkpointing.interval", "5 s");
        conf.setString("execution.checkpointing.min-pause", "1 s");
        conf.setString("execution.checkpointing.mode", "EXACTLY_ONCE");
        conf.setString("execution.checkpointing.dir", "file://" + checkpointDir);
        conf.setString("pipeline.object-reuse", "true");
        conf.setString("state.backend.type", backend.startsWith("rocksdb") ? "rocksdb" : backend);
        if (backend.startsWith("rocksdb")) {
            conf.setString("execution.checkpointing.incremental", "true");
            conf.setString("state.backend.rocksdb.use-bloom-filter", "true");
        }
        if (backend.contains("+memtable-bloom")) {
            conf.setString("state.backend.rocksdb.options-factory", MemtableBloom.class.getName());
        }
        if (backend.contains("+uncompressed-l0-l1")) {
            // The flush writes L0 and the first compactions L1 without Snappy; deeper levels keep it.
            conf.setString("state.backend.rocksdb.compression.per-level", "NO_COMPRESSION;NO_COMPRESSION;SNAPPY_COMPRESSION");
        }
        // About what the stack's 2560m TaskManager gives its slots as managed memory.
        conf.setString("taskmanager.memory.managed.size", "900m");
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment(conf);
        env.setParallelism(1);

        KafkaSource<Event> source = KafkaSource.<Event>builder()
                .setBootstrapServers(bootstrap)
                .setTopics(topic)
                .setGroupId("dedup-spike")
                .setStartingOffsets(OffsetsInitializer.earliest())
                .setBounded(OffsetsInitializer.latest())
                .setDeserializer(new Decode())
                .build();
        WatermarkStrategy<Event> watermarks = WatermarkStrategy.<Event>forBoundedOutOfOrderness(Duration.ofSeconds(5))
                .withTimestampAssigner((e, ts) -> e.eventTimeMs);
        if (mode.equals("stages")) {
            declareStages(env, bootstrap, topic);
        } else {
        DataStream<Event> events = env.fromSource(source, watermarks, "usage events").uid("source");
        events.keyBy(e -> Tuple2.of(e.idHigh, e.idLow), Types.TUPLE(Types.LONG, Types.LONG))
                .process(new Dedup(!mode.equals("exchange"), mode.equals("dedup+heap-bloom"), total), TypeInformation.of(Event.class))
                .uid("dedup")
                .sinkTo(new DiscardingSink<>())
                .uid("discard");
        }
        env.execute("dedup spike");

        if (SEEN.get() < total) {
            throw new IllegalStateException("read " + SEEN.get() + " events, expected " + total + " (rejected " + REJECTED.get() + ")");
        }
        double all = (WALL_NS[2] - WALL_NS[0]) / 1e9;
        double half = (WALL_NS[2] - WALL_NS[1]) / 1e9;
        long n = total - total / 2;
        System.out.printf(Locale.ROOT,
                "{\"mode\": \"%s\", \"backend\": \"%s\", \"events\": %d, \"kept\": %d, \"rejected\": %d, "
                        + "\"events_per_s\": %.0f, \"cpu_us_per_event\": %.2f, "
                        + "\"steady_events_per_s\": %.0f, \"steady_cpu_us_per_event\": %.2f, "
                        + "\"steady_from_ms\": %d, \"steady_to_ms\": %d}%n",
                mode, backend, total, KEPT.get(), REJECTED.get(),
                (total - 1) / all, (CPU_NS[2] - CPU_NS[0]) / 1e3 / (total - 1),
                n / half, (CPU_NS[2] - CPU_NS[1]) / 1e3 / n, EPOCH_MS[1], EPOCH_MS[2]);
    }
}
