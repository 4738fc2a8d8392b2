import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.apache.flink.avro.shaded.org.apache.avro.Schema;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericData;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumReader;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericDatumWriter;
import org.apache.flink.avro.shaded.org.apache.avro.generic.GenericRecord;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryDecoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.BinaryEncoder;
import org.apache.flink.avro.shaded.org.apache.avro.io.DecoderFactory;
import org.apache.flink.avro.shaded.org.apache.avro.io.EncoderFactory;
import org.apache.flink.avro.shaded.org.apache.avro.util.Utf8;
import org.apache.flink.formats.avro.AvroRowDataDeserializationSchema;
import org.apache.flink.table.data.DecimalData;
import org.apache.flink.table.data.GenericMapData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.data.TimestampData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.utils.LogicalTypeParser;

import dev.meterflow.format.UsageEventDecoder;

/**
 * Microbenchmark: usage events (avro/usage_event.avsc) from Avro binary to Flink internal rows, one
 * thread, in memory. Compares the format's hand-written decoder with Avro's GenericDatumReader
 * (reused decoder and record, converted to the same internal row) and with Flink's own `avro`
 * format. Prints figures; asserts only that every decoder produces the same rows.
 *
 * Run with bench/decode_bench.py (builds the classpath from the meterflow-jvm jar and the Flink jars).
 */
public class DecodeBench {

    interface Decoder {
        RowData decode(byte[] message) throws Exception;
    }

    public static void main(String[] args) throws Exception {
        int records = args.length > 0 ? Integer.parseInt(args[0]) : 200_000;
        int rounds = args.length > 1 ? Integer.parseInt(args[1]) : 10;
        Schema schema;
        try (InputStream in = UsageEventDecoder.class.getResourceAsStream("/avro/usage_event.avsc")) {
            schema = new Schema.Parser().parse(in);
        }
        byte[][] messages = dataset(schema, records);
        long bytes = Arrays.stream(messages).mapToLong(m -> m.length).sum();

        UsageEventDecoder handWritten = new UsageEventDecoder();
        Decoder hand = m -> {
            GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
            String reason = handWritten.decodeInto(m, row);
            if (reason != null) {
                throw new IllegalStateException(reason);
            }
            return row;
        };
        Decoder generic = genericDatumReader(schema);
        // Flink's format derives its reader schema from the row type: NOT NULL columns match the .avsc.
        String notNull = "ROW<`event_id` STRING NOT NULL, `tenant_id` STRING NOT NULL, `customer_id` STRING NOT NULL, "
                + "`meter` STRING NOT NULL, `quantity` DECIMAL(38, 9) NOT NULL, `event_time` TIMESTAMP(3) NOT NULL, "
                + "`dimensions` MAP<STRING NOT NULL, STRING NOT NULL> NOT NULL> NOT NULL";
        RowType rowType = (RowType) LogicalTypeParser.parse(notNull, DecodeBench.class.getClassLoader());
        AvroRowDataDeserializationSchema flinkAvro = new AvroRowDataDeserializationSchema(rowType, InternalTypeInfo.of(rowType));
        flinkAvro.open(null);
        Decoder flink = flinkAvro::deserialize;

        // Same rows from every decoder, before anything is timed.
        for (byte[] m : messages) {
            RowData a = hand.decode(m);
            RowData b = generic.decode(m);
            RowData c = flink.decode(m);
            for (int i = 0; i < UsageEventDecoder.ARITY - 1; i++) {
                Object fa = ((GenericRowData) a).getField(i);
                if (!fa.equals(((GenericRowData) b).getField(i)) || !fa.equals(((GenericRowData) c).getField(i))) {
                    throw new IllegalStateException("decoders disagree on field " + UsageEventDecoder.FIELDS[i]);
                }
            }
            if (a.getMap(6).size() != b.getMap(6).size() || a.getMap(6).size() != c.getMap(6).size()) {
                throw new IllegalStateException("decoders disagree on dimensions");
            }
        }

        System.out.printf("%,d records, %.1f bytes each on average, %d measured rounds after 5 warm-up rounds, one thread%n",
                records, (double) bytes / records, rounds);
        System.out.printf("Java %s, %s%n", System.getProperty("java.version"), System.getProperty("os.arch"));
        System.out.println();
        System.out.println("| decoder | ns/record (median) | ns/record (best) | records/s (median) |");
        System.out.println("|---|---:|---:|---:|");
        report("hand-written field-by-field (meterflow-avro)", hand, messages, rounds);
        report("Avro GenericDatumReader, reused decoder and record -> RowData", generic, messages, rounds);
        report("Flink's `avro` format (AvroRowDataDeserializationSchema)", flink, messages, rounds);
    }

    static void report(String name, Decoder decoder, byte[][] messages, int rounds) throws Exception {
        long sink = 0;
        for (int r = 0; r < 5; r++) {
            sink += run(decoder, messages);
        }
        double[] ns = new double[rounds];
        for (int r = 0; r < rounds; r++) {
            long start = System.nanoTime();
            sink += run(decoder, messages);
            ns[r] = (double) (System.nanoTime() - start) / messages.length;
        }
        Arrays.sort(ns);
        double median = ns[rounds / 2];
        System.out.printf("| %s | %.0f | %.0f | %,.0f |%s%n", name, median, ns[0], 1e9 / median, sink == 42 ? " " : "");
    }

    static long run(Decoder decoder, byte[][] messages) throws Exception {
        long sink = 0;
        for (byte[] m : messages) {
            sink += decoder.decode(m).getArity();
        }
        return sink;
    }

    /** Avro's generic reader as a format would use it: one decoder and one record, reused; then internal types. */
    static Decoder genericDatumReader(Schema schema) {
        GenericDatumReader<GenericRecord> reader = new GenericDatumReader<>(schema);
        int scale = 9;
        return new Decoder() {
            BinaryDecoder decoder;
            GenericRecord record;

            @Override
            public RowData decode(byte[] m) throws IOException {
                decoder = DecoderFactory.get().binaryDecoder(m, decoder);
                record = reader.read(record, decoder);
                GenericRowData row = new GenericRowData(UsageEventDecoder.ARITY);
                for (int i = 0; i < 4; i++) {
                    row.setField(i, str(record.get(i)));
                }
                ByteBuffer q = (ByteBuffer) record.get(4);
                byte[] unscaled = new byte[q.remaining()];
                q.duplicate().get(unscaled);
                row.setField(4, DecimalData.fromUnscaledBytes(unscaled, 38, scale));
                row.setField(5, TimestampData.fromEpochMillis((Long) record.get(5)));
                Map<?, ?> dims = (Map<?, ?>) record.get(6);
                Map<StringData, StringData> map = new HashMap<>(dims.size() * 2);
                for (Map.Entry<?, ?> e : dims.entrySet()) {
                    map.put(str(e.getKey()), str(e.getValue()));
                }
                row.setField(6, new GenericMapData(map));
                return row;
            }
        };
    }

    /** A copy: the reader reuses its Utf8 buffers. */
    static StringData str(Object value) {
        Utf8 utf8 = (Utf8) value;
        return StringData.fromBytes(Arrays.copyOf(utf8.getBytes(), utf8.getByteLength()));
    }

    /** Records shaped like bench/dataset.py's: uuid ids, 10 tenants x 20 customers, 2 meters, 0-2 dimensions. */
    static byte[][] dataset(Schema schema, int n) throws IOException {
        Random random = new Random(7);
        GenericDatumWriter<GenericRecord> writer = new GenericDatumWriter<>(schema);
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        BinaryEncoder encoder = null;
        List<byte[]> messages = new ArrayList<>(n);
        long t0 = 1_780_000_000_000L;
        for (int i = 0; i < n; i++) {
            GenericRecord r = new GenericData.Record(schema);
            r.put("event_id", new java.util.UUID(random.nextLong(), random.nextLong()).toString());
            r.put("tenant_id", "tenant-" + random.nextInt(10));
            r.put("customer_id", "customer-" + random.nextInt(20));
            boolean tokens = random.nextBoolean();
            r.put("meter", tokens ? "tokens" : "api_calls");
            BigDecimal quantity = tokens ? BigDecimal.valueOf(random.nextInt(5_000)) : new BigDecimal(random.nextInt(1_000_000)).movePointLeft(3);
            r.put("quantity", ByteBuffer.wrap(quantity.setScale(9).unscaledValue().toByteArray()));
            r.put("event_time", t0 + random.nextInt(3_600_000));
            Map<String, String> dims = new HashMap<>();
            if (tokens) {
                dims.put("model", "model-" + random.nextInt(3));
                if (random.nextBoolean()) {
                    dims.put("region", "eu-west-1");
                }
            }
            r.put("dimensions", dims);
            out.reset();
            encoder = EncoderFactory.get().binaryEncoder(out, encoder);
            writer.write(r, encoder);
            encoder.flush();
            messages.add(out.toByteArray());
        }
        return messages.toArray(new byte[0][]);
    }
}
